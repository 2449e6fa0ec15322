//! The on-volume structures of a namespace, bottom up: [`layout`] (where things are),
//! [`journal`] and [`pages`] (atomic metadata transactions), [`btree`] (the one ordered
//! map every namespace record lives in), [`alloc`] (the free-space bitmap), [`inode`]
//! (records and keys), and [`fsck`] (checks and repairs them). No network, no clock:
//! everything here runs on any [`crate::dev::BlockDev`], a plain file in the tests.

pub mod alloc;
pub mod btree;
pub mod fsck;
pub mod inode;
pub mod journal;
pub mod layout;
pub mod pages;

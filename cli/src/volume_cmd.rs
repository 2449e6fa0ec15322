//! `shoal volume ...`: create, list, inspect, delete, attach, detach, mount, unmount.

use std::collections::HashMap;

use anyhow::anyhow;
use clap::Subcommand;
use shoal_blockd::size::format_size;
use shoal_proto::control::control_client::ControlClient;
use shoal_proto::control::{
    AttachRequest, CreateVolumeRequest, FsckRequest, HaUpdateRequest, ListVolumesRequest,
    MountRequest, UnmountRequest, Volume, VolumeRef,
};
use tonic::transport::Channel;

use crate::node_cmd::parse_size_arg;
use crate::output::{volume_json, volume_text};
use crate::{status_error, table};

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a thin-provisioned volume.
    Create {
        name: String,
        /// Size limit, e.g. 10G (space is taken only as data is written).
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
        /// Number of replicas, on distinct nodes.
        #[arg(long, default_value_t = 1)]
        repl: u32,
        /// Block size, a power of two from 4K to 1M.
        #[arg(long, value_parser = parse_size_arg, default_value = "4K")]
        block_size: u64,
        /// Filesystem made on first attach (a shared volume always carries sharedfs).
        #[arg(long, default_value = "none", value_parser = ["none", "ext4", "sharedfs"])]
        fs: String,
        /// Label k=v (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// I/O priority class.
        #[arg(long, default_value = "medium", value_parser = ["high", "medium", "low"])]
        io_priority: String,
        /// One POSIX namespace mountable on many hosts at once (sharedfs).
        #[arg(long)]
        shared: bool,
        /// Pin replicas to these node ids (comma separated).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
    },
    /// List volumes.
    List,
    /// Show one volume with its replicas.
    Inspect { name: String },
    /// Delete a detached volume and its data.
    Delete { name: String },
    /// Attach a volume on a node (the answering node by default) as a raw device.
    Attach {
        name: String,
        /// Node id to attach on.
        #[arg(long)]
        node: Option<String>,
    },
    /// Detach a volume from the node it is attached to.
    Detach { name: String },
    /// Attach on the answering node and mount the volume's filesystem at PATH there.
    Mount { name: String, path: String },
    /// Unmount the volume filesystem mounted at PATH on the answering node.
    Unmount { path: String },
    /// Check a shared volume's on-volume namespace (and repair it with --repair).
    Fsck {
        name: String,
        /// Fix what the check finds.
        #[arg(long)]
        repair: bool,
    },
    /// Raise or lower the replication factor by one, online.
    HaUpdate {
        name: String,
        /// The new replication factor.
        #[arg(long)]
        repl: u32,
        /// Node to add the replica on, or to remove it from.
        #[arg(long)]
        node: Option<String>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} must look like key=value")),
    }
}

fn print_volume(v: &Volume, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(&volume_json(v))?);
    } else {
        volume_text(v);
    }
    Ok(())
}

pub async fn run(
    cmd: VolumeCmd,
    c: &mut ControlClient<Channel>,
    as_json: bool,
) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            repl,
            block_size,
            fs,
            labels,
            io_priority,
            shared,
            nodes,
        } => {
            let block_size = u32::try_from(block_size)
                .map_err(|_| anyhow!("block size {block_size} is too large (at most 1M)"))?;
            let labels: HashMap<String, String> = labels.into_iter().collect();
            let v = c
                .create_volume(CreateVolumeRequest {
                    name,
                    size_bytes: size,
                    repl,
                    block_size,
                    fs,
                    labels,
                    io_priority,
                    shared,
                    nodes,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if as_json {
                print_volume(&v, true)?;
            } else {
                println!("volume {} created ({}, repl {})", v.name, v.id, v.repl);
            }
        }
        VolumeCmd::List => {
            let vols = c
                .list_volumes(ListVolumesRequest {})
                .await
                .map_err(status_error)?
                .into_inner()
                .volumes;
            if as_json {
                let arr: Vec<_> = vols.iter().map(volume_json).collect();
                println!("{}", serde_json::to_string_pretty(&arr)?);
            } else {
                let rows: Vec<Vec<String>> = vols
                    .iter()
                    .map(|v| {
                        vec![
                            v.name.clone(),
                            v.id.clone(),
                            format_size(v.size_bytes),
                            format_size(v.used_bytes),
                            v.repl.to_string(),
                            v.fs.clone(),
                            v.state.clone(),
                            if v.attached_node.is_empty() {
                                "-".into()
                            } else {
                                v.attached_node.clone()
                            },
                        ]
                    })
                    .collect();
                table::print(
                    &["NAME", "ID", "SIZE", "USED", "REPL", "FS", "STATE", "NODE"],
                    &rows,
                );
            }
        }
        VolumeCmd::Inspect { name } => {
            let v = c
                .inspect_volume(VolumeRef { name })
                .await
                .map_err(status_error)?
                .into_inner();
            print_volume(&v, as_json)?;
        }
        VolumeCmd::Delete { name } => {
            c.delete_volume(VolumeRef { name: name.clone() })
                .await
                .map_err(status_error)?;
            if !as_json {
                println!("volume {name} deleted");
            } else {
                println!("{}", serde_json::json!({"deleted": name}));
            }
        }
        VolumeCmd::Attach { name, node } => {
            let v = c
                .attach_volume(AttachRequest {
                    name,
                    node_id: node.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume
                .ok_or_else(|| anyhow!("node answered without the volume"))?;
            if as_json {
                print_volume(&v, true)?;
            } else {
                println!(
                    "volume {} attached on node {} at {}",
                    v.name, v.attached_node, v.device_path
                );
            }
        }
        VolumeCmd::Detach { name } => {
            c.detach_volume(VolumeRef { name: name.clone() })
                .await
                .map_err(status_error)?;
            if as_json {
                println!("{}", serde_json::json!({"detached": name}));
            } else {
                println!("volume {name} detached");
            }
        }
        VolumeCmd::Mount { name, path } => {
            let v = c
                .mount_volume(MountRequest { name, path })
                .await
                .map_err(status_error)?
                .into_inner()
                .volume
                .ok_or_else(|| anyhow!("node answered without the volume"))?;
            if as_json {
                print_volume(&v, true)?;
            } else {
                println!(
                    "volume {} mounted at {} on node {}",
                    v.name, v.mount_path, v.attached_node
                );
            }
        }
        VolumeCmd::HaUpdate { name, repl, node } => {
            let v = c
                .ha_update(HaUpdateRequest {
                    name,
                    repl,
                    node_id: node.unwrap_or_default(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if as_json {
                print_volume(&v, true)?;
            } else {
                println!("volume {} now has repl {}", v.name, v.repl);
                volume_text(&v);
            }
        }
        VolumeCmd::Fsck { name, repair } => {
            let r = c
                .fsck_volume(FsckRequest {
                    name: name.clone(),
                    repair,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if as_json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "volume": name, "clean": r.clean, "repaired": r.repaired,
                        "problems": r.problems, "inodes": r.inodes,
                        "directories": r.directories, "blocks_in_use": r.blocks_in_use,
                    }))?
                );
            } else {
                for p in &r.problems {
                    println!("problem: {p}");
                }
                println!(
                    "{name}: {} inodes, {} directories, {} blocks in use: {}",
                    r.inodes,
                    r.directories,
                    r.blocks_in_use,
                    if r.problems.is_empty() {
                        "clean"
                    } else if r.repaired {
                        "repaired"
                    } else {
                        "NOT clean (run with --repair)"
                    }
                );
            }
            if !r.clean {
                std::process::exit(1);
            }
        }
        VolumeCmd::Unmount { path } => {
            c.unmount_volume(UnmountRequest { path: path.clone() })
                .await
                .map_err(status_error)?;
            if as_json {
                println!("{}", serde_json::json!({"unmounted": path}));
            } else {
                println!("unmounted {path}");
            }
        }
    }
    Ok(())
}

//! Docker's volume options → a Shoal volume spec.
//!
//! Options come two ways: `docker volume create -d shoal --opt size=5G --opt repl=2 web`
//! (a map), or inline in the name, `docker volume create -d shoal --name
//! size=5G,repl=2,name=web` (Docker passes the whole string as the volume's name, and
//! keeps using it as the name: every endpoint maps it back with [`volume_name`]).
//! Every option `shoal volume create` takes is accepted under its flag's name; a value
//! that does not parse, or an unknown option, is refused with a message naming it.

use std::collections::{BTreeMap, HashMap};

use shoal_proto::control::CreateVolumeRequest;

use crate::error::PluginError;

/// Size of a volume created without `size`: thin, so it costs only what is written.
pub const DEFAULT_SIZE: u64 = 10 << 30;

/// The options Docker may pass, as `shoal volume create` names its flags.
pub const KNOWN: &[&str] = &[
    "size",
    "repl",
    "shared",
    "fs",
    "block_size",
    "io_priority",
    "label",
    "nodes",
];

fn invalid(msg: String) -> PluginError {
    PluginError::InvalidOption(msg)
}

/// `block-size` and `Block_Size` are read as `block_size`.
fn normalize_key(key: &str) -> String {
    key.trim().to_ascii_lowercase().replace('-', "_")
}

/// An inline spec taken apart: the volume's name and its `key=value` options.
pub type InlineSpec = (String, Vec<(String, String)>);

/// Splits an inline spec (`size=5G,repl=2,name=web`) into its name and options; `None`
/// when `docker_name` is a plain name.
pub fn parse_inline(docker_name: &str) -> Result<Option<InlineSpec>, PluginError> {
    if !docker_name.contains('=') {
        return Ok(None);
    }
    let mut name = None;
    let mut opts = Vec::new();
    for part in docker_name.split(',').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(invalid(format!(
                "inline volume spec {docker_name:?}: {part:?} is not key=value"
            )));
        };
        let k = normalize_key(k);
        if k == "name" {
            if name.is_some() {
                return Err(invalid(format!(
                    "inline volume spec {docker_name:?} names the volume twice"
                )));
            }
            name = Some(v.trim().to_string());
        } else {
            opts.push((k, v.trim().to_string()));
        }
    }
    let name = name.ok_or_else(|| {
        invalid(format!(
            "inline volume spec {docker_name:?} has no name= (e.g. size=5G,repl=2,name=web)"
        ))
    })?;
    Ok(Some((name, opts)))
}

/// The Shoal volume a Docker volume name stands for.
pub fn volume_name(docker_name: &str) -> Result<String, PluginError> {
    let name = match parse_inline(docker_name)? {
        Some((name, _)) => name,
        None => docker_name.to_string(),
    };
    if name.is_empty() {
        return Err(PluginError::BadRequest("the volume name is empty".into()));
    }
    shoal_blockd::volumes::check_volume_name(&name).map_err(|e| invalid(e.to_string()))?;
    Ok(name)
}

fn parse_bool(key: &str, v: &str) -> Result<bool, PluginError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(invalid(format!(
            "option {key}={v:?}: expected true or false"
        ))),
    }
}

fn parse_size(key: &str, v: &str) -> Result<u64, PluginError> {
    shoal_blockd::size::parse_size(v).map_err(|e| invalid(format!("option {key}: {e}")))
}

/// Labels: `k=v`, or several as `k1=v1;k2=v2` (`k:v` is read the same).
fn parse_labels(v: &str, into: &mut HashMap<String, String>) -> Result<(), PluginError> {
    for item in v.split(';').filter(|s| !s.trim().is_empty()) {
        let Some((k, val)) = item.split_once('=').or_else(|| item.split_once(':')) else {
            return Err(invalid(format!(
                "option label={item:?}: expected key=value (several: k1=v1;k2=v2)"
            )));
        };
        let k = k.trim();
        if k.is_empty() {
            return Err(invalid(format!("option label={item:?}: the key is empty")));
        }
        into.insert(k.to_string(), val.trim().to_string());
    }
    Ok(())
}

/// The create request for `docker volume create` with this name and `--opt` map.
pub fn create_request(
    docker_name: &str,
    opts: &BTreeMap<String, String>,
) -> Result<CreateVolumeRequest, PluginError> {
    let name = volume_name(docker_name)?;
    let mut all: Vec<(String, String)> = match parse_inline(docker_name)? {
        Some((_, inline)) => inline,
        None => Vec::new(),
    };
    all.extend(
        opts.iter()
            .map(|(k, v)| (normalize_key(k), v.trim().to_string())),
    );

    let mut req = CreateVolumeRequest {
        name,
        size_bytes: DEFAULT_SIZE,
        repl: 1,
        block_size: 4096,
        fs: String::new(),
        labels: HashMap::new(),
        io_priority: "medium".into(),
        shared: false,
        nodes: Vec::new(),
    };
    let mut seen = BTreeMap::new();
    for (k, v) in &all {
        if let Some(before) = seen.insert(k.clone(), v.clone()) {
            if k != "label" && before != *v {
                return Err(invalid(format!(
                    "option {k} is given twice ({before:?} and {v:?})"
                )));
            }
        }
        match k.as_str() {
            "size" => req.size_bytes = parse_size(k, v)?,
            "repl" => {
                req.repl = v
                    .parse::<u32>()
                    .ok()
                    .filter(|r| (1..=3).contains(r))
                    .ok_or_else(|| invalid(format!("option repl={v:?}: expected 1, 2 or 3")))?
            }
            "shared" => req.shared = parse_bool(k, v)?,
            "fs" => match v.as_str() {
                "ext4" | "sharedfs" => req.fs = v.clone(),
                "none" => {
                    return Err(invalid(
                        "option fs=none leaves the volume without a filesystem, which Docker \
                         cannot mount: use fs=ext4, or shared=true"
                            .into(),
                    ))
                }
                other => {
                    return Err(invalid(format!(
                        "option fs={other:?}: expected ext4 or sharedfs"
                    )))
                }
            },
            "block_size" => {
                let b = parse_size(k, v)?;
                req.block_size = u32::try_from(b)
                    .map_err(|_| invalid(format!("option block_size={v:?}: at most 1M")))?;
            }
            "io_priority" => match v.as_str() {
                "high" | "medium" | "low" => req.io_priority = v.clone(),
                other => {
                    return Err(invalid(format!(
                        "option io_priority={other:?}: expected high, medium or low"
                    )))
                }
            },
            "label" => parse_labels(v, &mut req.labels)?,
            "nodes" => {
                req.nodes = v
                    .split([';', ' '])
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            other => {
                return Err(invalid(format!(
                    "unknown option {other:?} (known: {})",
                    KNOWN.join(", ")
                )))
            }
        }
    }
    if req.fs.is_empty() {
        // Docker mounts a filesystem: ext4 unless the volume is shared.
        req.fs = if req.shared { "sharedfs" } else { "ext4" }.into();
    }
    if req.fs == "sharedfs" {
        req.shared = true;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_for_a_bare_name() {
        let r = create_request("web", &BTreeMap::new()).unwrap();
        assert_eq!(r.name, "web");
        assert_eq!(r.size_bytes, DEFAULT_SIZE);
        assert_eq!((r.repl, r.fs.as_str(), r.shared), (1, "ext4", false));
        assert_eq!(r.io_priority, "medium");
    }

    #[test]
    fn every_option_by_name() {
        let r = create_request(
            "db",
            &opts(&[
                ("size", "5G"),
                ("repl", "2"),
                ("shared", "true"),
                ("block_size", "64K"),
                ("io_priority", "high"),
                ("label", "app=wp;tier:front"),
                ("nodes", "n1;n2"),
            ]),
        )
        .unwrap();
        assert_eq!(r.size_bytes, 5 << 30);
        assert_eq!(r.repl, 2);
        assert!(r.shared);
        assert_eq!(r.fs, "sharedfs");
        assert_eq!(r.block_size, 64 << 10);
        assert_eq!(r.io_priority, "high");
        assert_eq!(r.labels.get("app").map(String::as_str), Some("wp"));
        assert_eq!(r.labels.get("tier").map(String::as_str), Some("front"));
        assert_eq!(r.nodes, vec!["n1", "n2"]);
    }

    #[test]
    fn inline_spec_names_the_volume() {
        let name = "size=5G,repl=2,shared=true,name=web";
        assert_eq!(volume_name(name).unwrap(), "web");
        let r = create_request(name, &BTreeMap::new()).unwrap();
        assert_eq!((r.name.as_str(), r.size_bytes, r.repl), ("web", 5 << 30, 2));
        assert!(r.shared);
        // Dashes and case in keys are forgiven.
        let r = create_request("Block-Size=8K,name=x", &BTreeMap::new()).unwrap();
        assert_eq!(r.block_size, 8192);
    }

    #[test]
    fn refusals_name_what_was_wrong() {
        let err = |name: &str, o: &[(&str, &str)]| {
            create_request(name, &opts(o)).unwrap_err().to_string()
        };
        assert!(err("v", &[("colour", "red")]).contains("unknown option \"colour\""));
        assert!(err("v", &[("size", "big")]).contains("size"));
        assert!(err("v", &[("repl", "7")]).contains("repl=\"7\""));
        assert!(err("v", &[("shared", "maybe")]).contains("shared=\"maybe\""));
        assert!(err("v", &[("fs", "none")]).contains("fs=none"));
        assert!(err("v", &[("fs", "xfs")]).contains("fs=\"xfs\""));
        assert!(err("v", &[("io_priority", "urgent")]).contains("io_priority"));
        assert!(err("v", &[("label", "novalue")]).contains("label"));
        assert!(err("size=1G,repl=2", &[]).contains("no name="));
        assert!(err("size=1G,name=a,name=b", &[]).contains("twice"));
        assert!(err("size=1G,name=a", &[("size", "2G")]).contains("given twice"));
        assert!(err("size=1G,oops,name=a", &[]).contains("\"oops\" is not key=value"));
        assert!(volume_name("bad/name").is_err());
        assert!(volume_name("").is_err());
    }
}

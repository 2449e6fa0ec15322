//! The volume plugin endpoints (`/Plugin.Activate`, `/VolumeDriver.*`): request JSON in,
//! reply JSON out. Errors are answered as `{"Err": "..."}` so Docker shows them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::backend::{Backend, VolumeInfo};
use crate::error::PluginError;
use crate::mounts::MountTable;
use crate::options;
use crate::time::rfc3339;

/// Docker's content type for plugin replies.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// An answer: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Reply { status: 200, body }
    }

    pub fn error(status: u16, msg: impl std::fmt::Display) -> Self {
        Reply {
            status,
            body: json!({ "Err": msg.to_string() }),
        }
    }
}

impl From<PluginError> for Reply {
    fn from(e: PluginError) -> Self {
        // Docker reads `Err` from any answer; 200 is what it expects for a refusal, a
        // malformed request gets 400 so a stranger sees it is the request that is wrong.
        let status = match e {
            PluginError::BadRequest(_) => 400,
            _ => 200,
        };
        Reply::error(status, e)
    }
}

/// The fields Docker's volume requests carry (each endpoint uses some of them).
/// Fields it does not know are ignored: newer engines may send more.
#[derive(Debug, Default, Deserialize)]
struct Request {
    #[serde(rename = "Name")]
    name: Option<String>,
    #[serde(rename = "Opts")]
    opts: Option<BTreeMap<String, String>>,
    #[serde(rename = "ID")]
    id: Option<String>,
}

impl Request {
    fn parse(body: &[u8]) -> Result<Self, PluginError> {
        let trimmed = body.trim_ascii();
        if trimmed.is_empty() || trimmed == b"null" {
            return Ok(Request::default());
        }
        serde_json::from_slice(body)
            .map_err(|e| PluginError::BadRequest(format!("request body is not valid JSON: {e}")))
    }

    fn name(&self) -> Result<&str, PluginError> {
        match self.name.as_deref() {
            Some(n) if !n.is_empty() => Ok(n),
            _ => Err(PluginError::BadRequest("missing field Name".into())),
        }
    }

    fn id(&self) -> Result<&str, PluginError> {
        match self.id.as_deref() {
            Some(id) if !id.is_empty() => Ok(id),
            _ => Err(PluginError::BadRequest("missing field ID".into())),
        }
    }
}

/// The plugin: endpoints over a backend, with this host's mount table.
pub struct Plugin<B> {
    backend: B,
    /// Volumes are mounted at `<mount_root>/<volume>`.
    mount_root: PathBuf,
    /// Held across a mount or unmount so concurrent requests see each other's outcome.
    table: Mutex<MountTable>,
}

impl<B: Backend> Plugin<B> {
    pub fn new(backend: B, mount_root: PathBuf) -> Self {
        Plugin {
            backend,
            mount_root,
            table: Mutex::new(MountTable::default()),
        }
    }

    /// Answers one request to `endpoint` (the URL path) with this body.
    pub async fn handle(&self, endpoint: &str, body: &[u8]) -> Reply {
        let span = info_span!("docker", %endpoint);
        async {
            let req = match Request::parse(body) {
                Ok(r) => r,
                Err(e) => return Reply::from(e),
            };
            let out = match endpoint {
                "/Plugin.Activate" => Ok(json!({ "Implements": ["VolumeDriver"] })),
                "/VolumeDriver.Capabilities" => {
                    // One volume name is one volume on every host.
                    Ok(json!({ "Capabilities": { "Scope": "global" } }))
                }
                "/VolumeDriver.Create" => self.create(&req).await,
                "/VolumeDriver.Remove" => self.remove(&req).await,
                "/VolumeDriver.Mount" => self.mount(&req).await,
                "/VolumeDriver.Unmount" => self.unmount(&req).await,
                "/VolumeDriver.Path" => self.path(&req).await,
                "/VolumeDriver.Get" => self.get(&req).await,
                "/VolumeDriver.List" => self.list().await,
                other => {
                    return Reply::error(404, format!("unknown endpoint {other:?}"));
                }
            };
            match out {
                Ok(body) => Reply::ok(body),
                // Docker asks every driver for a name before it creates a volume: a
                // miss is routine, not worth a warning.
                Err(e @ PluginError::NotFound(_)) => {
                    debug!(error = %e, "not found");
                    Reply::from(e)
                }
                Err(e) => {
                    warn!(error = %e, "refused");
                    Reply::from(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    fn mount_path(&self, volume: &str) -> PathBuf {
        self.mount_root.join(volume)
    }

    async fn create(&self, req: &Request) -> Result<Value, PluginError> {
        let spec = options::create_request(req.name()?, &req.opts.clone().unwrap_or_default())?;
        let volume = spec.name.clone();
        self.backend
            .create(spec)
            .instrument(info_span!("create", %volume))
            .await?;
        info!(%volume, "volume created");
        Ok(json!({ "Err": "" }))
    }

    async fn remove(&self, req: &Request) -> Result<Value, PluginError> {
        let volume = options::volume_name(req.name()?)?;
        // Held so no mount starts while the volume goes.
        let table = self.table.lock().await;
        let n = table.holders(&volume);
        if n > 0 {
            return Err(PluginError::InUse(format!(
                "volume {volume:?} is in use by {n} container(s) on this host"
            )));
        }
        self.backend.remove(&volume).await?;
        info!(%volume, "volume removed");
        Ok(json!({ "Err": "" }))
    }

    async fn mount(&self, req: &Request) -> Result<Value, PluginError> {
        let volume = options::volume_name(req.name()?)?;
        let id = req.id()?;
        let mut table = self.table.lock().await;
        if let Some(path) = table.hold(&volume, id) {
            info!(%volume, %id, holders = table.holders(&volume), "mount: already mounted");
            return Ok(json!({ "Mountpoint": path, "Err": "" }));
        }
        let path = self.mount_path(&volume);
        let detach_after = self
            .backend
            .mount(&volume, &path)
            .instrument(info_span!("mount", %volume))
            .await?;
        table.mounted(&volume, id, path.clone(), detach_after);
        info!(%volume, %id, path = %path.display(), "mounted");
        Ok(json!({ "Mountpoint": path, "Err": "" }))
    }

    async fn unmount(&self, req: &Request) -> Result<Value, PluginError> {
        let volume = options::volume_name(req.name()?)?;
        let id = req.id()?;
        let mut table = self.table.lock().await;
        let Some(last) = table.release(&volume, id) else {
            info!(%volume, %id, holders = table.holders(&volume), "unmount: still held");
            return Ok(json!({ "Err": "" }));
        };
        if let Err(e) = self
            .backend
            .unmount(&volume, &last.path, last.detach_after)
            .instrument(info_span!("unmount", %volume))
            .await
        {
            table.restore(&volume, id, last);
            return Err(e);
        }
        info!(%volume, %id, "unmounted");
        Ok(json!({ "Err": "" }))
    }

    async fn path(&self, req: &Request) -> Result<Value, PluginError> {
        let volume = options::volume_name(req.name()?)?;
        let table = self.table.lock().await;
        let path = table
            .path(&volume)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(json!({ "Mountpoint": path, "Err": "" }))
    }

    fn describe(&self, docker_name: &str, v: &VolumeInfo, table: &MountTable) -> Value {
        let path = table
            .path(&v.name)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        json!({
            "Name": docker_name,
            "Mountpoint": path,
            "CreatedAt": rfc3339(v.created_unix),
            "Status": v.status,
        })
    }

    async fn get(&self, req: &Request) -> Result<Value, PluginError> {
        let docker_name = req.name()?;
        let volume = options::volume_name(docker_name)?;
        let v = self.backend.get(&volume).await?;
        let table = self.table.lock().await;
        Ok(json!({ "Volume": self.describe(docker_name, &v, &table), "Err": "" }))
    }

    async fn list(&self) -> Result<Value, PluginError> {
        let all = self.backend.list().await?;
        let table = self.table.lock().await;
        let vols: Vec<Value> = all
            .iter()
            .map(|v| self.describe(&v.name, v, &table))
            .collect();
        Ok(json!({ "Volumes": vols, "Err": "" }))
    }
}

#[cfg(test)]
mod tests {
    //! The endpoint logic over an in-memory backend (the real node is exercised by the
    //! Docker integration tests in `tests/tests/docker.rs`).

    use super::*;
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Mutex as StdMutex;

    use shoal_proto::control::CreateVolumeRequest;

    #[derive(Default)]
    struct Memory {
        volumes: StdMutex<HashMap<String, CreateVolumeRequest>>,
        /// (event, volume) in order.
        log: StdMutex<Vec<(String, String)>>,
    }

    impl Memory {
        fn events(&self) -> Vec<(String, String)> {
            self.log.lock().unwrap().clone()
        }
    }

    impl Backend for Memory {
        async fn create(&self, req: CreateVolumeRequest) -> Result<(), PluginError> {
            self.volumes
                .lock()
                .unwrap()
                .entry(req.name.clone())
                .or_insert(req);
            Ok(())
        }
        async fn get(&self, name: &str) -> Result<VolumeInfo, PluginError> {
            let v = self.volumes.lock().unwrap();
            let r = v
                .get(name)
                .ok_or_else(|| PluginError::NotFound(name.into()))?;
            Ok(VolumeInfo {
                name: r.name.clone(),
                created_unix: 0,
                status: BTreeMap::from([("repl".into(), json!(r.repl))]),
            })
        }
        async fn list(&self) -> Result<Vec<VolumeInfo>, PluginError> {
            let names: Vec<String> = self.volumes.lock().unwrap().keys().cloned().collect();
            let mut out = Vec::new();
            for n in names {
                out.push(self.get(&n).await?);
            }
            Ok(out)
        }
        async fn remove(&self, name: &str) -> Result<(), PluginError> {
            self.volumes.lock().unwrap().remove(name);
            self.log
                .lock()
                .unwrap()
                .push(("remove".into(), name.into()));
            Ok(())
        }
        async fn mount(&self, name: &str, _path: &Path) -> Result<bool, PluginError> {
            self.log.lock().unwrap().push(("mount".into(), name.into()));
            Ok(false)
        }
        async fn unmount(&self, name: &str, _: &Path, _: bool) -> Result<(), PluginError> {
            self.log
                .lock()
                .unwrap()
                .push(("unmount".into(), name.into()));
            Ok(())
        }
    }

    fn plugin() -> Plugin<Memory> {
        Plugin::new(Memory::default(), "/mnt/shoal".into())
    }

    async fn call(p: &Plugin<Memory>, ep: &str, body: Value) -> Reply {
        p.handle(ep, body.to_string().as_bytes()).await
    }

    #[tokio::test]
    async fn mount_counting_keeps_the_volume_for_the_last_holder() {
        let p = plugin();
        let r = call(
            &p,
            "/VolumeDriver.Create",
            json!({"Name": "size=1G,repl=2,name=web"}),
        )
        .await;
        assert_eq!(r.body["Err"], "");
        let inline = "size=1G,repl=2,name=web";
        let m1 = call(
            &p,
            "/VolumeDriver.Mount",
            json!({"Name": inline, "ID": "c1"}),
        )
        .await;
        assert_eq!(m1.body["Mountpoint"], "/mnt/shoal/web");
        let m2 = call(
            &p,
            "/VolumeDriver.Mount",
            json!({"Name": "web", "ID": "c2"}),
        )
        .await;
        assert_eq!(m2.body["Mountpoint"], "/mnt/shoal/web");
        let rm = call(&p, "/VolumeDriver.Remove", json!({"Name": "web"})).await;
        assert!(rm.body["Err"].as_str().unwrap().contains("in use by 2"));
        call(
            &p,
            "/VolumeDriver.Unmount",
            json!({"Name": "web", "ID": "c1"}),
        )
        .await;
        let path = call(&p, "/VolumeDriver.Path", json!({"Name": "web"})).await;
        assert_eq!(path.body["Mountpoint"], "/mnt/shoal/web");
        call(
            &p,
            "/VolumeDriver.Unmount",
            json!({"Name": "web", "ID": "c2"}),
        )
        .await;
        let path = call(&p, "/VolumeDriver.Path", json!({"Name": "web"})).await;
        assert_eq!(path.body["Mountpoint"], "");
        let rm = call(&p, "/VolumeDriver.Remove", json!({"Name": "web"})).await;
        assert_eq!(rm.body["Err"], "");
        let ev: Vec<String> = p.backend.events().into_iter().map(|e| e.0).collect();
        assert_eq!(ev, ["mount", "unmount", "remove"]);
    }

    #[tokio::test]
    async fn get_and_list_show_docker_names() {
        let p = plugin();
        let missing = call(&p, "/VolumeDriver.Get", json!({"Name": "nope"})).await;
        assert!(missing.body["Err"].as_str().unwrap().contains("not found"));
        call(
            &p,
            "/VolumeDriver.Create",
            json!({"Name": "db", "Opts": {"repl": "3"}}),
        )
        .await;
        let g = call(&p, "/VolumeDriver.Get", json!({"Name": "db"})).await;
        assert_eq!(g.body["Volume"]["Name"], "db");
        assert_eq!(g.body["Volume"]["Status"]["repl"], 3);
        assert_eq!(g.body["Volume"]["CreatedAt"], "1970-01-01T00:00:00Z");
        let l = call(&p, "/VolumeDriver.List", json!({})).await;
        assert_eq!(l.body["Volumes"][0]["Name"], "db");
        let caps = p.handle("/VolumeDriver.Capabilities", b"").await;
        assert_eq!(caps.body["Capabilities"]["Scope"], "global");
        let act = p.handle("/Plugin.Activate", b"").await;
        assert_eq!(act.body["Implements"][0], "VolumeDriver");
    }

    #[tokio::test]
    async fn malformed_requests_get_an_err_answer() {
        let p = plugin();
        let r = p.handle("/VolumeDriver.Mount", b"{not json").await;
        assert_eq!(r.status, 400);
        assert!(r.body["Err"].as_str().unwrap().contains("not valid JSON"));
        let r = call(&p, "/VolumeDriver.Mount", json!({"Name": "web"})).await;
        assert!(r.body["Err"].as_str().unwrap().contains("missing field ID"));
        let r = call(&p, "/VolumeDriver.Create", json!({"Opts": {}})).await;
        assert!(r.body["Err"]
            .as_str()
            .unwrap()
            .contains("missing field Name"));
        let r = call(
            &p,
            "/VolumeDriver.Create",
            json!({"Name": "v", "Opts": {"size": 5}}),
        )
        .await;
        assert_eq!(r.status, 400);
        let r = call(
            &p,
            "/VolumeDriver.Create",
            json!({"Name": "v", "Opts": {"bogus": "1"}}),
        )
        .await;
        assert!(r.body["Err"]
            .as_str()
            .unwrap()
            .contains("unknown option \"bogus\""));
        let r = call(&p, "/VolumeDriver.Frobnicate", json!({})).await;
        assert_eq!(r.status, 404);
        assert!(p.backend.events().is_empty());
    }
}

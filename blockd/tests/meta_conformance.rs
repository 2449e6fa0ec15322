//! One conformance suite over both metadata stores: the embedded store and a real etcd
//! (started from the `etcd` binary on a free loopback port; skipped with a message when
//! the binary is missing).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_blockd::meta::{Claim, EmbeddedStore, EtcdAuth, EtcdStore, MetaStore};

async fn conformance(store: &MetaStore) {
    let p = format!("/conf/{}/", rand_suffix());
    let k = |s: &str| format!("{p}{s}");

    // Absent keys.
    assert!(store.get(&k("a")).await.unwrap().is_none());
    assert!(store.list(&p).await.unwrap().is_empty());

    // put_if with 0 creates only when absent.
    assert!(store.put_if(&k("a"), "one", 0).await.unwrap());
    assert!(!store.put_if(&k("a"), "two", 0).await.unwrap());
    let a = store.get(&k("a")).await.unwrap().unwrap();
    assert_eq!(a.value, "one");
    assert!(a.rev > 0);

    // Compare-and-swap on the revision.
    assert!(!store.put_if(&k("a"), "stale", a.rev + 1000).await.unwrap());
    assert!(store.put_if(&k("a"), "two", a.rev).await.unwrap());
    let a2 = store.get(&k("a")).await.unwrap().unwrap();
    assert_eq!(a2.value, "two");
    assert!(a2.rev > a.rev, "revisions grow");
    assert!(
        !store.put_if(&k("a"), "three", a.rev).await.unwrap(),
        "old revision refused"
    );

    // Unconditional put and prefix listing in key order, not leaking other prefixes.
    store.put(&k("c"), "C").await.unwrap();
    store.put(&k("b"), "B").await.unwrap();
    store.put(&format!("{p}x/nested"), "N").await.unwrap();
    store
        .put(&format!("{}zz", p.trim_end_matches('/')), "outside")
        .await
        .unwrap();
    let keys: Vec<String> = store
        .list(&p)
        .await
        .unwrap()
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, [k("a"), k("b"), k("c"), k("x/nested")]);

    // Conditional delete.
    let b = store.get(&k("b")).await.unwrap().unwrap();
    assert!(!store.delete_if(&k("b"), b.rev + 1).await.unwrap());
    assert!(store.delete_if(&k("b"), b.rev).await.unwrap());
    assert!(store.get(&k("b")).await.unwrap().is_none());
    assert!(
        !store.delete_if(&k("b"), b.rev).await.unwrap(),
        "absent key"
    );
    assert!(!store.delete_if(&k("nothing"), 0).await.unwrap());

    // Delete one key and write another, atomically: both or neither.
    let a = store.get(&k("a")).await.unwrap().unwrap();
    assert!(!store
        .delete_put_if(&k("a"), a.rev + 1, &k("tomb"), "t")
        .await
        .unwrap());
    assert!(store.get(&k("tomb")).await.unwrap().is_none(), "neither");
    assert!(store.get(&k("a")).await.unwrap().is_some());
    assert!(store
        .delete_put_if(&k("a"), a.rev, &k("tomb"), "t")
        .await
        .unwrap());
    assert!(store.get(&k("a")).await.unwrap().is_none());
    assert_eq!(store.get(&k("tomb")).await.unwrap().unwrap().value, "t");

    // Concurrent compare-and-swap increments lose no update.
    store.put(&k("counter"), "0").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let s = store.clone();
        let key = k("counter");
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                loop {
                    let cur = s.get(&key).await.unwrap().unwrap();
                    let n: u64 = cur.value.parse().unwrap();
                    if s.put_if(&key, &(n + 1).to_string(), cur.rev).await.unwrap() {
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(store.get(&k("counter")).await.unwrap().unwrap().value, "40");

    claims(store, &k("role")).await;
}

/// A claimed key belongs to one holder while its lease is renewed; a released or
/// expired lease frees it for the next claimer.
async fn claims(store: &MetaStore, key: &str) {
    let ttl = Duration::from_secs(2);
    let Claim::Held { lease: first } = store.claim(key, "node-a", ttl).await.unwrap() else {
        panic!("an absent key is claimed");
    };
    match store.claim(key, "node-b", ttl).await.unwrap() {
        Claim::Taken(kv) => assert_eq!(kv.value, "node-a", "the holder is named"),
        held => panic!("a held key was claimed again: {held:?}"),
    }
    assert!(store.renew(first).await.unwrap(), "a live lease renews");
    assert_eq!(
        store.get(key).await.unwrap().map(|kv| kv.value),
        Some("node-a".to_string()),
        "a claimed key reads back"
    );
    store.release(first).await.unwrap();
    assert!(
        !store.renew(first).await.unwrap(),
        "a released lease is gone"
    );
    assert!(
        store.get(key).await.unwrap().is_none(),
        "and its key with it"
    );
    let Claim::Held { lease: second } = store.claim(key, "node-b", ttl).await.unwrap() else {
        panic!("a released key is claimed");
    };
    // Not renewed: the store drops it after the TTL, and the next claimer gets it.
    let start = Instant::now();
    loop {
        match store.claim(key, "node-c", ttl).await.unwrap() {
            Claim::Held { lease } => {
                assert!(!store.renew(second).await.unwrap(), "expired lease is gone");
                assert!(
                    start.elapsed() >= Duration::from_secs(1),
                    "not before the TTL"
                );
                store.release(lease).await.unwrap();
                break;
            }
            Claim::Taken(_) => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "an unrenewed claim never expired"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn rand_suffix() -> String {
    format!("{:x}", rand::random::<u64>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.json");
    let store = MetaStore::Embedded(EmbeddedStore::open(&path).unwrap());
    conformance(&store).await;
    store.put("/persist/me", "yes").await.unwrap();
    let rev = store.get("/persist/me").await.unwrap().unwrap().rev;
    drop(store);
    let reopened = MetaStore::Embedded(EmbeddedStore::open(&path).unwrap());
    let kv = reopened.get("/persist/me").await.unwrap().unwrap();
    assert_eq!(kv.value, "yes");
    assert_eq!(kv.rev, rev, "revisions survive a reopen");
    // New revisions stay above old ones after reopen.
    reopened.put("/persist/other", "x").await.unwrap();
    assert!(reopened.get("/persist/other").await.unwrap().unwrap().rev > rev);
}

#[test]
fn embedded_store_refuses_a_corrupt_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.json");
    std::fs::write(&path, b"{not json").unwrap();
    let err = EmbeddedStore::open(&path)
        .err()
        .expect("corrupt file refused");
    assert!(err.to_string().contains("corrupt"), "{err}");
}

/// The etcd process and its data dir (removed when dropped, after the process).
struct EtcdProc(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for EtcdProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_etcd() -> Option<(EtcdProc, String)> {
    start_etcd_with(tempfile::tempdir().unwrap(), "http", &[])
}

/// etcd on a free port of 127.0.0.1, with `extra` flags (TLS); None without the binary.
fn start_etcd_with(
    dir: tempfile::TempDir,
    scheme: &str,
    extra: &[String],
) -> Option<(EtcdProc, String)> {
    let (cp, pp) = (free_port(), free_port());
    let client = format!("{scheme}://127.0.0.1:{cp}");
    let peer = format!("http://127.0.0.1:{pp}");
    let child = Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path().join("etcd"))
        .args(extra)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("default={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let proc = EtcdProc(child, dir);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", cp)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "etcd did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((proc, client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() {
    let Some((_etcd, url)) = start_etcd() else {
        eprintln!("SKIPPED: no etcd binary (apt-get install etcd-server)");
        return;
    };
    let store = MetaStore::Etcd(Box::new(EtcdStore::connect(&[url]).await.unwrap()));
    conformance(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_down_fails_fast_with_a_clear_error() {
    let port = free_port();
    let start = Instant::now();
    let err = EtcdStore::connect(&[format!("http://127.0.0.1:{port}")])
        .await
        .err()
        .expect("no etcd there");
    assert!(err.to_string().contains("unavailable"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// Runs a command that must succeed.
fn run(cmd: &str, args: &[&str], dir: &std::path::Path) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and two certificates it signs, in `dir`: `server` (for 127.0.0.1) and
/// `client`; `other-ca` is a CA that signed nothing.
fn make_certs(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            &key,
            "-out",
            &crt,
            "-subj",
            "/CN=shoal-test",
            "-days",
            "2",
        ]);
        run("openssl", &a, dir);
    }
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr, crt, extf) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN={name}");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        run("openssl", &a, dir);
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extf,
            ],
            dir,
        );
    }
}

fn pem(dir: &std::path::Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// etcd with TLS, client certificates and authentication on: the store connects with
/// the CA, a client certificate and a user, and conforms; a wrong password, a missing
/// client certificate, another CA or plain HTTP are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_over_tls_with_a_user_conforms() {
    let have = |c: &str| Command::new(c).arg("version").output().is_ok();
    if !have("openssl") || !have("etcd") || !have("etcdctl") {
        eprintln!("SKIPPED: needs openssl, etcd and etcdctl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    make_certs(&d);
    let p = |n: &str| d.join(n).display().to_string();
    let tls = vec![
        format!("--cert-file={}", p("server.crt")),
        format!("--key-file={}", p("server.key")),
        format!("--trusted-ca-file={}", p("ca.crt")),
        "--client-cert-auth".to_string(),
    ];
    let (_etcd, url) = start_etcd_with(dir, "https", &tls).expect("etcd");
    let ctl = |args: &[&str]| {
        let mut a = vec![
            format!("--endpoints={url}"),
            format!("--cacert={}", p("ca.crt")),
            format!("--cert={}", p("client.crt")),
            format!("--key={}", p("client.key")),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        run("etcdctl", &a, &d);
    };
    ctl(&["user", "add", "root:root-pw", "--interactive=false"]);
    ctl(&["user", "add", "shoal:shoal-pw", "--interactive=false"]);
    ctl(&["role", "add", "shoal"]);
    ctl(&[
        "role",
        "grant-permission",
        "shoal",
        "--prefix=true",
        "readwrite",
        "/",
    ]);
    ctl(&["user", "grant-role", "shoal", "shoal"]);
    ctl(&["auth", "enable"]);

    let auth = |password: &str, client: bool, ca: &str| EtcdAuth {
        ca_pem: Some(pem(&d, ca)),
        client: client.then(|| (pem(&d, "client.crt"), pem(&d, "client.key"))),
        user: Some(("shoal".into(), password.into())),
    };
    let urls = [url.clone()];
    let store = EtcdStore::connect_with(&urls, &auth("shoal-pw", true, "ca.crt"))
        .await
        .expect("TLS, client certificate and user accepted");
    conformance(&MetaStore::Etcd(Box::new(store))).await;

    for (why, a) in [
        ("a wrong password", auth("guess", true, "ca.crt")),
        ("no client certificate", auth("shoal-pw", false, "ca.crt")),
        ("another CA", auth("shoal-pw", true, "other-ca.crt")),
    ] {
        let refused = EtcdStore::connect_with(&urls, &a).await;
        assert!(refused.is_err(), "{why} was accepted");
    }
    let plain = [url.replace("https://", "http://")];
    assert!(
        EtcdStore::connect(&plain).await.is_err(),
        "plain HTTP to a TLS etcd was accepted"
    );
}

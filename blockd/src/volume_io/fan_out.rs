//! Sending one request to several replicas at once: remote ones in parallel (on this
//! thread's own connections when it has them, else through the node's runtime), the
//! local one on this thread, every answer kept with its node.

use super::*;

impl VolumeIo {
    /// Runs `call` against every remote replica among `nodes` in parallel, and `local`
    /// on this thread when the local replica is among them; returns every answer.
    pub(super) fn fan_out<F, Fut>(
        &self,
        nodes: &BTreeSet<String>,
        call: F,
        local: impl FnOnce() -> Result<()>,
    ) -> Vec<Answer>
    where
        F: Fn(&str, PeerBlockClient) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
    {
        self.fan_out_sized(nodes, call, local, usize::MAX)
    }

    /// `fan_out` for a request of `len` bytes: small ones go from this thread.
    pub(super) fn fan_out_sized<F, Fut>(
        &self,
        nodes: &BTreeSet<String>,
        call: F,
        local: impl FnOnce() -> Result<()>,
        len: usize,
    ) -> Vec<Answer>
    where
        F: Fn(&str, PeerBlockClient) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
    {
        let mut local = Some(local);
        if len <= THREAD_IO_MAX {
            if let Some(answers) = self.fan_out_here(nodes, &call, &mut local) {
                return answers;
            }
        }
        let local = local.expect("only taken when answered here");
        self.fan_out_shared(nodes, &call, local)
    }

    /// `fan_out` through the node's runtime: the remote calls are spawned there and run
    /// while this thread writes the local replica.
    fn fan_out_shared<F, Fut>(
        &self,
        nodes: &BTreeSet<String>,
        call: &F,
        local: impl FnOnce() -> Result<()>,
    ) -> Vec<Answer>
    where
        F: Fn(&str, PeerBlockClient) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
    {
        let timeout = self.timeout;
        let mut pending = Vec::new();
        let mut local_wanted = false;
        let replicas = self.replicas();
        for r in replicas.iter().filter(|r| nodes.contains(&r.node)) {
            match &r.target {
                Target::Local => local_wanted = true,
                Target::Remote(client) => {
                    let fut = call(&r.node, (**client).clone());
                    let timed = async move { tokio::time::timeout(timeout, fut).await };
                    pending.push((r.node.clone(), self.rt.spawn(timed)));
                }
            }
        }
        let mut answers = Vec::with_capacity(pending.len() + 1);
        if local_wanted {
            answers.push((self.local_node.clone(), local()));
        }
        for (node, handle) in pending {
            let res = remote_answer(&node, self.rt.block_on(handle), timeout);
            answers.push((node, res));
        }
        answers
    }

    /// `fan_out` on this thread's own runtime and connections (`thread_io`). None (and
    /// `local` not run) when that is not set up for every remote target.
    fn fan_out_here<F, Fut, L>(
        &self,
        nodes: &BTreeSet<String>,
        call: &F,
        local: &mut Option<L>,
    ) -> Option<Vec<Answer>>
    where
        F: Fn(&str, PeerBlockClient) -> Fut,
        Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
        L: FnOnce() -> Result<()>,
    {
        let guard = self.thread_peers.read().expect("thread peers");
        let tp = guard.as_ref()?;
        let replicas = self.replicas();
        let mut local_wanted = false;
        let mut remotes: Vec<(String, String)> = Vec::new();
        for r in replicas.iter().filter(|r| nodes.contains(&r.node)) {
            match &r.target {
                Target::Local => local_wanted = true,
                Target::Remote(_) => {
                    remotes.push((r.node.clone(), tp.addresses.get(&r.node)?.clone()))
                }
            }
        }
        let addrs: Vec<&str> = remotes.iter().map(|(_, a)| a.as_str()).collect();
        let timeout = self.timeout;
        let (mut answers, retry) = thread_io::with_clients(&tp.peers, &addrs, |rt, clients| {
            rt.block_on(async {
                let mut calls = Vec::with_capacity(clients.len());
                for ((node, _), c) in remotes.iter().zip(clients) {
                    let fut = call(node, c);
                    calls.push(tokio::spawn(async move {
                        tokio::time::timeout(timeout, fut).await
                    }));
                }
                // Let the requests reach the wire before the local write (a few polls
                // of this thread's tasks: the call, the channel, the connection).
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
                let mut answers = Vec::with_capacity(calls.len() + 1);
                if local_wanted {
                    let l = local.take().expect("local runs once");
                    answers.push((self.local_node.clone(), l()));
                }
                let mut retry = Vec::new();
                for ((node, addr), call) in remotes.iter().zip(calls) {
                    let res = call.await;
                    // The connection broke (it may have idled out): once more on the
                    // node's shared one before calling the replica failed.
                    if let Ok(Ok(Err(status))) = &res {
                        if matches!(
                            status.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::Unknown
                                | tonic::Code::Cancelled
                        ) {
                            retry.push((node.clone(), addr.clone()));
                            continue;
                        }
                    }
                    answers.push((node.clone(), remote_answer(node, res, timeout)));
                }
                (answers, retry)
            })
        })?;
        drop(guard);
        if !retry.is_empty() {
            let again: BTreeSet<String> = retry.iter().map(|(n, _)| n.clone()).collect();
            for (_, addr) in &retry {
                thread_io::forget(addr);
            }
            // Only remote nodes are in `again`: the local write is not repeated.
            answers.extend(self.fan_out_shared(&again, call, || Ok(())));
        }
        Some(answers)
    }
}

//! `weft-cni`: a chained CNI plugin (CNI 1.0 and 1.1) that enrolls each new pod with its
//! node's mesh-node before the pod's containers run.
//!
//! The container runtime calls it after the pod's interface plugin, with the network
//! configuration (and that plugin's result, `prevResult`) on stdin and the call in `CNI_*`
//! variables:
//!
//! - `ADD` asks the node agent (a Unix socket, `agent_socket` in the configuration) to enroll
//!   the pod: the agent checks that the network namespace it is given holds the pod's address
//!   (a wrong pairing would send the pod's traffic under another pod's identity), meshes the
//!   pod in the eBPF maps and answers once they hold it. Then the plugin passes `prevResult`
//!   on. While the agent cannot enroll the pod the plugin fails with "try again later" (11):
//!   the runtime retries and the pod waits; it never starts unmeshed. A pod of a namespace the
//!   agent last saw unmeshed (`namespaces.json` beside the socket) is let through even when
//!   the agent is down.
//! - `DEL` tells the agent the pod is gone; it never fails (the runtime must be able to clean
//!   up whatever happened).
//! - `CHECK` asks the agent whether the pod is still enrolled.
//! - `STATUS` (CNI 1.1) fails with "plugin not available" (50) while the agent is not ready.
//! - `VERSION` lists the versions spoken; `GC` (CNI 1.1) has nothing to collect.

use std::{
    collections::BTreeSet,
    io::{self, BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The agent's socket when the configuration names none.
pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/weft/cni.sock";
/// The namespaces the agent last saw, beside its socket.
pub const NAMESPACES_FILE: &str = "namespaces.json";
/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long the plugin waits for the agent's answer (it answers once the maps hold the pod).
const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

/// CNI's error codes (SPEC.md, "Error"), and Weft's own from 100.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The network namespace does not hold the pod's address.
    pub const WRONG_NETNS: u32 = 100;
    /// The runtime's address is not the pod's.
    pub const WRONG_ADDRESS: u32 = 101;
}

/// What the plugin asks the agent, one JSON line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    pub container_id: String,
    #[serde(default)]
    pub netns: String,
    pub namespace: String,
    pub pod: String,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default)]
    pub ips: Vec<Ipv4Addr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
}

/// The agent's answer, one JSON line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// Whether the pod is meshed (enrolled), for `ADD` and `CHECK`.
    #[serde(default)]
    pub meshed: bool,
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl Response {
    pub fn enrolled(meshed: bool) -> Self {
        Self {
            ok: true,
            meshed,
            ..Self::default()
        }
    }

    pub fn error(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            ok: false,
            code,
            msg: msg.into(),
            details: details.into(),
            ..Self::default()
        }
    }
}

/// The namespaces the agent last saw, written beside its socket for when it is down.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    pub meshed: BTreeSet<String>,
    pub unmeshed: BTreeSet<String>,
}

/// The plugin's part of the network configuration (the rest is passed through).
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(rename = "prevResult", default)]
    prev_result: Option<Value>,
}

/// The `CNI_*` variables of a call.
#[derive(Clone, Debug, Default)]
pub struct Call {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub args: String,
}

impl Call {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: var("CNI_ARGS"),
        }
    }

    /// A `K=V` of `CNI_ARGS` (`;`-separated).
    fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .split(';')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}

/// What the plugin prints and exits with.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit: i32,
}

impl Outcome {
    fn ok(value: &Value) -> Self {
        Self {
            stdout: value.to_string(),
            exit: 0,
        }
    }

    fn error(version: &str, code: u32, msg: &str, details: &str) -> Self {
        Self {
            stdout: json!({"cniVersion": version, "code": code, "msg": msg, "details": details})
                .to_string(),
            exit: 1,
        }
    }
}

/// One call of the plugin: `call` from the environment, `stdin` the network configuration.
/// `ask` reaches the agent ([`ask_agent`] outside tests).
pub fn run(
    call: &Call,
    stdin: &[u8],
    ask: &dyn Fn(&Path, &Request) -> io::Result<Response>,
) -> Outcome {
    if call.command == "VERSION" {
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|c| c["cniVersion"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "1.1.0".into());
        return Outcome::ok(&json!({
            "cniVersion": version,
            "supportedVersions": SUPPORTED_VERSIONS,
        }));
    }
    let conf: NetConf = match serde_json::from_slice(stdin) {
        Ok(conf) => conf,
        Err(e) => {
            return Outcome::error(
                "1.0.0",
                code::DECODE,
                "cannot read the network configuration",
                &e.to_string(),
            )
        }
    };
    let version = conf.cni_version.as_str();
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Outcome::error(
            version,
            code::INCOMPATIBLE_VERSION,
            "unsupported CNI version",
            &format!("weft-cni speaks {SUPPORTED_VERSIONS:?}"),
        );
    }
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
    let command = match call.command.as_str() {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        "STATUS" => Command::Status,
        "GC" => return Outcome::ok(&json!({"cniVersion": version})),
        other => {
            return Outcome::error(
                version,
                code::INVALID_ENVIRONMENT,
                "unknown CNI_COMMAND",
                &format!("{other:?}"),
            )
        }
    };
    let (namespace, pod) = (
        call.arg("K8S_POD_NAMESPACE").unwrap_or_default(),
        call.arg("K8S_POD_NAME").unwrap_or_default(),
    );
    if command != Command::Status && (namespace.is_empty() || pod.is_empty()) {
        // Not a Kubernetes pod: nothing of Weft's to do.
        return passthrough(command, version, &conf);
    }
    let ips = conf
        .prev_result
        .as_ref()
        .map(addresses_of)
        .unwrap_or_default();
    if command == Command::Add && conf.prev_result.is_none() {
        return Outcome::error(
            version,
            code::INVALID_CONFIG,
            "weft-cni is a chained plugin: it needs prevResult",
            "list it after the plugin that creates the pod's interface",
        );
    }
    let request = Request {
        command,
        container_id: call.container_id.clone(),
        netns: call.netns.clone(),
        namespace: namespace.to_owned(),
        pod: pod.to_owned(),
        uid: call.arg("K8S_POD_UID").map(str::to_owned),
        ips,
    };
    match ask(&socket, &request) {
        Ok(answer) if answer.ok => passthrough(command, version, &conf),
        Ok(answer) => Outcome::error(version, answer.code, &answer.msg, &answer.details),
        Err(e) => agent_down(command, version, &conf, &socket, namespace, &e),
    }
}

/// Success: `ADD` passes the previous plugin's result on, the others print nothing.
fn passthrough(command: Command, version: &str, conf: &NetConf) -> Outcome {
    match (command, &conf.prev_result) {
        (Command::Add, Some(prev)) => {
            let mut result = prev.clone();
            result["cniVersion"] = json!(version);
            Outcome::ok(&result)
        }
        _ => Outcome {
            stdout: String::new(),
            exit: 0,
        },
    }
}

/// The agent could not be asked: a pod of a namespace last seen unmeshed goes ahead, any
/// other waits (the runtime tries again).
fn agent_down(
    command: Command,
    version: &str,
    conf: &NetConf,
    socket: &Path,
    namespace: &str,
    error: &io::Error,
) -> Outcome {
    if command == Command::Del {
        return passthrough(command, version, conf);
    }
    let details = format!("{}: {error}", socket.display());
    if command == Command::Status {
        return Outcome::error(
            version,
            code::NOT_AVAILABLE,
            "the node's mesh-node is not running",
            &details,
        );
    }
    let known = socket
        .parent()
        .map(|dir| dir.join(NAMESPACES_FILE))
        .and_then(|path| std::fs::read(path).ok())
        .and_then(|text| serde_json::from_slice::<Namespaces>(&text).ok())
        .unwrap_or_default();
    if known.unmeshed.contains(namespace) {
        return passthrough(command, version, conf);
    }
    Outcome::error(
        version,
        code::TRY_AGAIN_LATER,
        &format!(
            "the node's mesh-node is not running: a pod of namespace {namespace} waits for it \
             (it would run unmeshed)"
        ),
        &details,
    )
}

/// The IPv4 addresses of a CNI result (`ips[].address`, CIDR notation).
fn addresses_of(result: &Value) -> Vec<Ipv4Addr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

/// `weft-cni install`: what the DaemonSet's init container runs on each node. Copies this
/// binary into the runtime's plugin directory and chains the plugin into the node's network
/// (the first `.conflist` of `conf_dir`, in name order, as runtimes read them), after the
/// plugins already there. Running it again changes nothing.
pub fn install(bin_dir: &Path, conf_dir: &Path, agent_socket: &Path) -> io::Result<PathBuf> {
    let this = std::env::current_exe()?;
    let target = bin_dir.join("weft-cni");
    let staged = bin_dir.join(".weft-cni.new");
    std::fs::copy(&this, &staged)?;
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::rename(&staged, &target)?;
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    let Some(list) = lists.first() else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no .conflist in {}: install the cluster's network plugin first",
                conf_dir.display()
            ),
        ));
    };
    let text = std::fs::read(list)?;
    let config: Value = serde_json::from_slice(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", list.display()),
        )
    })?;
    if let Some(chained) = chain(config, agent_socket) {
        let staged = list.with_extension("conflist.weft");
        std::fs::write(
            &staged,
            serde_json::to_vec_pretty(&chained).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&staged, list)?;
    }
    Ok(list.clone())
}

/// `conflist` with weft-cni last in its plugins, `None` if it is there already.
fn chain(mut conflist: Value, agent_socket: &Path) -> Option<Value> {
    let plugins = conflist.get_mut("plugins")?.as_array_mut()?;
    if plugins.iter().any(|p| p["type"] == "weft-cni") {
        return None;
    }
    plugins.push(json!({"type": "weft-cni", "agent_socket": agent_socket}));
    Some(conflist)
}

/// Asks the agent on `socket`: one JSON line there, one back.
pub fn ask_agent(socket: &Path, request: &Request) -> io::Result<Response> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(AGENT_TIMEOUT))?;
    stream.set_write_timeout(Some(AGENT_TIMEOUT))?;
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    serde_json::from_str(&answer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"weft-cni",
        "agent_socket":"/nonexistent/weft/cni.sock",
        "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/p"}],
                      "ips":[{"address":"10.244.1.7/24","gateway":"10.244.1.1","interface":0}]}}"#;

    fn call(command: &str) -> Call {
        Call {
            command: command.into(),
            container_id: "c1".into(),
            netns: "/var/run/netns/p".into(),
            args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=u-1"
                .into(),
        }
    }

    #[test]
    fn add_asks_the_agent_then_passes_the_previous_result_on() {
        let asked = RefCell::new(None);
        let out = run(&call("ADD"), CONF.as_bytes(), &|socket, request| {
            asked.replace(Some((socket.to_owned(), request.clone())));
            Ok(Response::enrolled(true))
        });
        assert_eq!(out.exit, 0, "{}", out.stdout);
        let result: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(result["ips"][0]["address"], "10.244.1.7/24");
        let (socket, request) = asked.take().unwrap();
        assert_eq!(socket, Path::new("/nonexistent/weft/cni.sock"));
        assert_eq!(
            request,
            Request {
                command: Command::Add,
                container_id: "c1".into(),
                netns: "/var/run/netns/p".into(),
                namespace: "shop".into(),
                pod: "cart-0".into(),
                uid: Some("u-1".into()),
                ips: vec![Ipv4Addr::new(10, 244, 1, 7)],
            }
        );
    }

    #[test]
    fn an_agent_that_refuses_fails_the_call_with_its_reason() {
        let out = run(&call("ADD"), CONF.as_bytes(), &|_, _| {
            Ok(Response::error(
                code::WRONG_NETNS,
                "the network namespace does not hold the pod's address",
                "10.244.1.7",
            ))
        });
        assert_eq!(out.exit, 1);
        let error: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(error["code"], code::WRONG_NETNS);
        assert_eq!(error["cniVersion"], "1.0.0");
    }

    #[test]
    fn without_the_agent_a_meshed_or_unknown_namespace_waits_and_an_unmeshed_one_goes() {
        let dir = std::env::temp_dir().join(format!("weft-cni-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = CONF.replace("/nonexistent/weft", &dir.display().to_string());
        let down = |_: &Path, _: &Request| -> io::Result<Response> {
            Err(io::Error::from(io::ErrorKind::ConnectionRefused))
        };
        // Nothing known: wait.
        let out = run(&call("ADD"), conf.as_bytes(), &down);
        let error: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!((out.exit, error["code"].as_u64()), (1, Some(11)));
        let known = Namespaces {
            meshed: ["shop".to_owned()].into(),
            unmeshed: ["kube-system".to_owned()].into(),
        };
        std::fs::write(
            dir.join(NAMESPACES_FILE),
            serde_json::to_vec(&known).unwrap(),
        )
        .unwrap();
        assert_eq!(run(&call("ADD"), conf.as_bytes(), &down).exit, 1);
        let mut system = call("ADD");
        system.args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1".into();
        let out = run(&system, conf.as_bytes(), &down);
        assert_eq!(out.exit, 0, "{}", out.stdout);
        // DEL never fails; STATUS says the plugin is not available.
        assert_eq!(run(&call("DEL"), conf.as_bytes(), &down).exit, 0);
        let out = run(&call("STATUS"), conf.as_bytes(), &down);
        let error: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(error["code"], code::NOT_AVAILABLE);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn install_chains_the_plugin_once_after_the_others() {
        let list = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network",
                          "plugins": [{"type": "ptp"}, {"type": "portmap"}]});
        let socket = Path::new("/var/run/weft/cni.sock");
        let chained = chain(list, socket).expect("chained");
        assert_eq!(chained["plugins"][2]["type"], "weft-cni");
        assert_eq!(
            chained["plugins"][2]["agent_socket"],
            "/var/run/weft/cni.sock"
        );
        assert_eq!(chained["plugins"][0]["type"], "ptp");
        assert!(
            chain(chained, socket).is_none(),
            "installing again changes nothing"
        );
        assert!(
            chain(json!({"type": "bridge"}), socket).is_none(),
            "not a conflist"
        );
    }

    #[test]
    fn version_and_bad_input() {
        let out = run(&call("VERSION"), br#"{"cniVersion":"1.1.0"}"#, &|_, _| {
            unreachable!("VERSION asks nobody")
        });
        let version: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(version["supportedVersions"][3], "1.0.0");
        let never = |_: &Path, _: &Request| -> io::Result<Response> { unreachable!() };
        let out = run(&call("ADD"), b"not json", &never);
        assert_eq!(out.exit, 1);
        let out = run(
            &call("ADD"),
            CONF.replace("1.0.0", "9.9.9").as_bytes(),
            &never,
        );
        let error: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(error["code"], code::INCOMPATIBLE_VERSION);
        let unchained = r#"{"cniVersion":"1.0.0","name":"n","type":"weft-cni"}"#;
        let error: Value =
            serde_json::from_str(&run(&call("ADD"), unchained.as_bytes(), &never).stdout).unwrap();
        assert_eq!(error["code"], code::INVALID_CONFIG);
    }
}

//! Gateway configuration: reads `gateway.toml`, applies environment
//! overrides and validates everything once into typed values.
//!
//! This module owns reading and validating the config. It must never clamp or
//! silently fix a bad value: anything out of range is an error that names its
//! field and says how to fix it, and all errors are collected before
//! returning. It never does I/O beyond reading the file and resolving endpoint
//! hosts (and `localhost` in `listen`).
//!
//! Two layers: the serde structs ([`RawConfig`] and friends, every table
//! `deny_unknown_fields`, every key defaulted) mirror the file; `validate`
//! turns them into [`Config`]'s typed values. Reading the file removes (and
//! reports) unknown keys and keys with a value of the wrong type before
//! deserializing, so such a key never hides the errors elsewhere in the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

/// Field name used for problems that belong to the file as a whole.
const FILE_FIELD: &str = "gateway.toml";
const MAX_WORKERS: usize = 1024;
const REDACTED: &str = "***";

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// One problem with one field: `field` is a dotted path such as
/// `models["llama-8b"].endpoints[0]`, or an environment variable name.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in the config, in file order where there is one.
#[derive(Debug, thiserror::Error)]
#[error("{}", join_lines(.0))]
pub struct ConfigErrors(pub Vec<FieldError>);

fn join_lines(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(FieldError::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Collector, so every check can report and carry on.
#[derive(Default)]
struct Errs(Vec<FieldError>);

impl Errs {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }
}

// ---------------------------------------------------------------------------
// Raw layer: the file as written (plus defaults and env overrides)
// ---------------------------------------------------------------------------

/// The whole file. `#[serde(default)]` everywhere, so serializing a
/// `Config::raw` gives the effective config.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConfig {
    pub gateway: RawGateway,
    pub timeouts: RawTimeouts,
    pub retry: RawRetry,
    pub gpus: RawGpus,
    pub docker: RawDocker,
    pub models: Vec<RawModel>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGateway {
    pub listen: String,
    pub workers: usize,
    pub driver: String,
    pub log_level: String,
    pub log_format: String,
    pub max_queue_size: usize,
    pub max_concurrent: usize,
    pub queue_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub admin_token: String,
    pub api_keys: Vec<String>,
    pub max_header_bytes: usize,
    pub shutdown_grace_s: u64,
}

impl Default for RawGateway {
    fn default() -> Self {
        RawGateway {
            listen: "127.0.0.1:8080".to_string(),
            workers: 0,
            driver: "auto".to_string(),
            log_level: "info".to_string(),
            log_format: "text".to_string(),
            max_queue_size: 200,
            max_concurrent: 50,
            queue_timeout_ms: 60_000,
            max_body_bytes: 32 * 1024 * 1024,
            admin_token: String::new(),
            api_keys: Vec::new(),
            max_header_bytes: 64 * 1024,
            shutdown_grace_s: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect_ms: u64,
    pub first_byte_ms: u64,
    pub idle_ms: u64,
    pub header_read_ms: u64,
    pub client_idle_ms: u64,
    pub pool_idle_ms: u64,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            connect_ms: 2_000,
            first_byte_ms: 300_000,
            idle_ms: 60_000,
            header_read_ms: 10_000,
            client_idle_ms: 75_000,
            // Below vLLM's 5 s keep-alive, so we drop a pooled connection
            // before the server does and never write into a closing socket.
            pool_idle_ms: 4_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: u32,
    pub backoff_ms: u64,
    pub multiplier: f64,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            attempts: 3,
            backoff_ms: 1_000,
            multiplier: 1.5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawGpus {
    pub vram_mib: Vec<u64>,
}

impl Default for RawGpus {
    fn default() -> Self {
        RawGpus {
            vram_mib: vec![81_920],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDocker {
    pub host: String,
}

/// One `[[models]]` entry. Runtime-specific keys are `Option` so that a key
/// written for the wrong runtime can be reported rather than ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    pub aliases: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    pub runtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    pub vram_mib: u64,
    pub gpus: Vec<usize>,
    pub pinned: bool,
    pub preload: bool,
    pub idle_unload_s: u64,
    pub startup_timeout_s: u64,
    pub health_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue_size: Option<usize>,
}

impl Default for RawModel {
    fn default() -> Self {
        RawModel {
            name: String::new(),
            aliases: Vec::new(),
            upstream_model: None,
            runtime: "static".to_string(),
            endpoints: None,
            command: None,
            image: None,
            args: None,
            container_port: None,
            env: None,
            vram_mib: 0,
            gpus: vec![0],
            pinned: false,
            preload: false,
            idle_unload_s: 0,
            startup_timeout_s: 900,
            health_path: "/health".to_string(),
            max_concurrent: None,
            max_queue_size: None,
        }
    }
}

const DEFAULT_CONTAINER_PORT: u16 = 8000;

// ---------------------------------------------------------------------------
// Typed layer
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The effective raw config: file values, defaults, env overrides and
    /// per-model inherited values filled in. Holds secrets; log
    /// [`Config::redacted_json`] instead.
    pub raw: RawConfig,
    pub gateway: GatewaySettings,
    pub timeouts: Timeouts,
    pub retry: Retry,
    /// Total VRAM per GPU, indexed by GPU number.
    pub gpu_vram_mib: Vec<u64>,
    /// `None`: use `DOCKER_HOST` or the local socket.
    pub docker_host: Option<String>,
    pub models: Vec<ModelSpec>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    /// 0 = one per CPU core (resolved by the caller, not here).
    pub workers: usize,
    pub driver: Driver,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub max_queue_size: usize,
    pub max_concurrent: usize,
    pub queue_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub admin_token: Option<String>,
    pub api_keys: Vec<String>,
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    pub idle: Duration,
    pub header_read: Duration,
    pub client_idle: Duration,
    pub pool_idle: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Total connect attempts, >= 1.
    pub attempts: u32,
    pub backoff: Duration,
    /// Finite and >= 1.0.
    pub multiplier: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Auto,
    IoUring,
    Epoll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

const DRIVERS: &[(&str, Driver)] = &[
    ("auto", Driver::Auto),
    ("io_uring", Driver::IoUring),
    ("epoll", Driver::Epoll),
];
const LOG_LEVELS: &[(&str, LogLevel)] = &[
    ("error", LogLevel::Error),
    ("warn", LogLevel::Warn),
    ("info", LogLevel::Info),
    ("debug", LogLevel::Debug),
    ("trace", LogLevel::Trace),
];
const LOG_FORMATS: &[(&str, LogFormat)] = &[("text", LogFormat::Text), ("json", LogFormat::Json)];

/// Looks `s` up in a name table; the error lists every allowed name.
fn lookup<T: Copy>(table: &[(&str, T)], what: &str, s: &str) -> Result<T, String> {
    match table.iter().find(|(name, _)| *name == s) {
        Some((_, v)) => Ok(*v),
        None => Err(format!(
            "{s:?} is not a valid {what}; use one of {}",
            table
                .iter()
                .map(|(name, _)| format!("{name:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn name_of<T: Copy + PartialEq>(table: &[(&'static str, T)], v: T) -> &'static str {
    table
        .iter()
        .find(|(_, x)| *x == v)
        .map_or("", |(name, _)| *name)
}

impl Driver {
    pub fn as_str(&self) -> &'static str {
        name_of(DRIVERS, *self)
    }
}

impl FromStr for Driver {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        lookup(DRIVERS, "driver", s)
    }
}

impl LogLevel {
    pub fn as_str(&self) -> &'static str {
        name_of(LOG_LEVELS, *self)
    }
}

/// Accepts the lowercase names only: `error`, `warn`, `info`, `debug`, `trace`.
impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        lookup(LOG_LEVELS, "log level", s)
    }
}

impl LogFormat {
    pub fn as_str(&self) -> &'static str {
        name_of(LOG_FORMATS, *self)
    }
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        lookup(LOG_FORMATS, "log format", s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub aliases: Vec<String>,
    pub upstream_model: String,
    pub runtime: RuntimeSpec,
    /// Ignored for static models.
    pub vram_mib: u64,
    /// Ignored for static models.
    pub gpus: Vec<usize>,
    pub pinned: bool,
    pub preload: bool,
    /// `None` = never unload.
    pub idle_unload: Option<Duration>,
    pub startup_timeout: Duration,
    pub health_path: String,
    pub max_concurrent: usize,
    pub max_queue_size: usize,
}

impl ModelSpec {
    pub fn runtime_name(&self) -> &'static str {
        match self.runtime {
            RuntimeSpec::Static { .. } => "static",
            RuntimeSpec::Process { .. } => "process",
            RuntimeSpec::Docker { .. } => "docker",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeSpec {
    Static {
        endpoints: Vec<EndpointSpec>,
    },
    Process {
        /// Contains `{port}` in at least one element.
        command: Vec<String>,
        env: BTreeMap<String, String>,
    },
    Docker {
        image: String,
        args: Vec<String>,
        container_port: u16,
        env: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointSpec {
    /// As written in the file.
    pub url: String,
    pub addr: SocketAddr,
    /// `host:port` as written, for the Host header.
    pub authority: String,
}

impl Config {
    /// Take, from the running config, the settings a reload cannot apply (they need a
    /// restart), so this config describes what is really in effect.
    pub fn keep_restart_settings_from(&mut self, running: &Config) {
        self.gateway.listen = running.gateway.listen;
        self.gateway.workers = running.gateway.workers;
        self.gateway.driver = running.gateway.driver;
        self.gateway.log_format = running.gateway.log_format;
        self.docker_host = running.docker_host.clone();
        let (raw, old) = (&mut self.raw, &running.raw);
        raw.gateway.listen = old.gateway.listen.clone();
        raw.gateway.workers = old.gateway.workers;
        raw.gateway.driver = old.gateway.driver.clone();
        raw.gateway.log_format = old.gateway.log_format.clone();
        raw.docker.host = old.docker.host.clone();
    }

    /// The effective config as JSON with secrets replaced by `"***"`: a
    /// non-empty `admin_token`, every `api_keys` entry and every model `env`
    /// value (they often carry tokens such as `HF_TOKEN`).
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut raw = self.raw.clone();
        if !raw.gateway.admin_token.is_empty() {
            raw.gateway.admin_token = REDACTED.to_string();
        }
        for key in &mut raw.gateway.api_keys {
            *key = REDACTED.to_string();
        }
        for model in &mut raw.models {
            for value in model.env.iter_mut().flat_map(|env| env.values_mut()) {
                *value = REDACTED.to_string();
            }
        }
        // Cannot fail for these types (string keys only); keep the error
        // visible rather than panicking if that ever changes.
        serde_json::to_value(&raw).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
    }
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// Reads the file and validates it with the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![FieldError::new(
            path.display().to_string(),
            format!("cannot read the config file: {e}; check the path and its permissions"),
        )])
    })?;
    parse_str(&text, &|name| std::env::var(name).ok())
}

/// Parses and validates `text`; `env` looks up override variables (an
/// empty value counts as unset).
///
/// Every problem is reported, not just the first: an unknown key or a key
/// whose value has the wrong type is reported and dropped, and the rest of
/// the file is still read and validated. Only a TOML syntax error stops
/// early, as nothing can be read then.
pub fn parse_str(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let mut errs = Errs::default();
    let Some((mut raw, dropped)) = parse_raw(text, &mut errs) else {
        return Err(ConfigErrors(errs.0));
    };
    apply_env(&mut raw, env, &mut errs);
    let labels = model_labels(&raw.models);
    match validate(raw) {
        Ok(config) if errs.0.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(errs.0)),
        Err(ConfigErrors(more)) => {
            // A dropped key already has its error; the default standing in
            // for it must not add a second, misleading one.
            errs.0.extend(
                more.into_iter()
                    .filter(|e| !dropped.hides(&e.field, &labels)),
            );
            Err(ConfigErrors(errs.0))
        }
    }
}

// ---------------------------------------------------------------------------
// TOML → RawConfig, one table (section or model) at a time. Unknown keys and
// keys whose value does not fit are reported, each with its key path and
// line, and dropped, so that the rest of the file is still read and
// validated.
// ---------------------------------------------------------------------------

/// What reading the file had to drop. Validation sees defaults in its place,
/// so its errors about those values (and the values checked against them)
/// are not reported: the dropped key already has its error.
#[derive(Default)]
struct Dropped {
    /// Whole sections or section keys, e.g. `gateway` or `gpus.vram_mib`.
    paths: Vec<String>,
    /// `(index into RawConfig::models, key)`.
    model_keys: Vec<(usize, String)>,
}

/// Model keys whose checks depend on the model's `runtime`.
const RUNTIME_KEYS: &[&str] = &[
    "endpoints",
    "command",
    "image",
    "args",
    "container_port",
    "env",
    "gpus",
    "vram_mib",
];

impl Dropped {
    /// Whether a validation error on `field` is about a dropped value.
    /// `labels` are the models' labels as validation writes them.
    fn hides(&self, field: &str, labels: &[String]) -> bool {
        let under = |path: &str| {
            field
                .strip_prefix(path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        };
        let model_key = |label: &str, key: &str| under(&key_path(label, key));
        if self.paths.iter().any(|p| under(p)) {
            return true;
        }
        // Models are placed on the GPUs that [gpus] vram_mib lists.
        if self
            .paths
            .iter()
            .any(|p| p == "gpus" || p == "gpus.vram_mib")
            && labels
                .iter()
                .any(|l| model_key(l, "gpus") || model_key(l, "vram_mib"))
        {
            return true;
        }
        self.model_keys.iter().any(|(i, key)| {
            let Some(label) = labels.get(*i) else {
                return false;
            };
            match key.as_str() {
                "runtime" => RUNTIME_KEYS.iter().any(|k| model_key(label, k)),
                "gpus" | "vram_mib" => model_key(label, "gpus") || model_key(label, "vram_mib"),
                _ => model_key(label, key),
            }
        })
    }
}

/// `None` after a TOML syntax error: nothing can be read then.
fn parse_raw(text: &str, errs: &mut Errs) -> Option<(RawConfig, Dropped)> {
    let mut raw = RawConfig::default();
    let mut dropped = Dropped::default();
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            errs.add(FILE_FIELD, located(text, e.span(), e.message()));
        }
        return None;
    }
    // (span start, error) so the report follows the file, not key order.
    let mut found: Vec<(usize, FieldError)> = Vec::new();
    let mut sink = Found {
        text,
        found: &mut found,
        dropped: &mut dropped,
    };
    for (key, value) in doc.into_inner() {
        let name = key.get_ref().to_string();
        match name.as_str() {
            "gateway" => sink.section(&name, value, &mut raw.gateway),
            "timeouts" => sink.section(&name, value, &mut raw.timeouts),
            "retry" => sink.section(&name, value, &mut raw.retry),
            "gpus" => sink.section(&name, value, &mut raw.gpus),
            "docker" => sink.section(&name, value, &mut raw.docker),
            "models" => raw.models = sink.models(value),
            _ => {
                let hint = closest(&name, struct_keys::<RawConfig>())
                    .map(|k| format!("did you mean {k:?}? "))
                    .unwrap_or_default();
                let msg = format!(
                    "unknown top-level key {name:?}; {hint}the file has only [gateway], \
                     [timeouts], [retry], [gpus], [docker] and [[models]]; remove it or fix \
                     its spelling"
                );
                sink.push(key_path("", &name), key.span(), &msg);
            }
        }
    }
    found.sort_by_key(|(pos, _)| *pos);
    errs.0.extend(found.into_iter().map(|(_, e)| e));
    Some((raw, dropped))
}

/// Where reading the file records its errors and what it dropped.
struct Found<'a> {
    text: &'a str,
    found: &'a mut Vec<(usize, FieldError)>,
    dropped: &'a mut Dropped,
}

impl Found<'_> {
    fn push(&mut self, field: String, span: std::ops::Range<usize>, message: &str) {
        let error = FieldError::new(field, located(self.text, Some(span.clone()), message));
        self.found.push((span.start, error));
    }

    /// Reads one `[section]` into `out`; keeps the defaults where it cannot.
    fn section<T: DeserializeOwned>(
        &mut self,
        name: &str,
        value: Spanned<DeValue<'_>>,
        out: &mut T,
    ) {
        if !value.get_ref().is_table() {
            let msg = format!("must be a table, written as [{name}] on its own line");
            self.push(name.to_string(), value.span(), &msg);
            self.dropped.paths.push(name.to_string());
            return;
        }
        match self.table(name, &format!("[{name}]"), value) {
            Some((v, bad)) => {
                *out = v;
                let paths = bad.iter().map(|key| key_path(name, key));
                self.dropped.paths.extend(paths);
            }
            None => self.dropped.paths.push(name.to_string()),
        }
    }

    fn models(&mut self, value: Spanned<DeValue<'_>>) -> Vec<RawModel> {
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            let msg = "must be an array of tables: write each model as a [[models]] section";
            self.push("models".to_string(), span, msg);
            return Vec::new();
        };
        // Name each model as validation does, so both halves agree.
        let names: Vec<&str> = items
            .iter()
            .map(|item| {
                item.get_ref()
                    .get("name")
                    .and_then(|n| n.get_ref().as_str())
                    .unwrap_or_default()
            })
            .collect();
        let mut models = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let prefix = model_label(i, names[i], &names);
            if !item.get_ref().is_table() {
                let msg = "must be a table: write each model as a [[models]] section";
                self.push(prefix, item.span(), msg);
                continue;
            }
            if let Some((m, bad)) = self.table(&prefix, "[[models]]", item.clone()) {
                let index = models.len();
                models.push(m);
                let keys = bad.into_iter().map(|key| (index, key));
                self.dropped.model_keys.extend(keys);
            }
        }
        models
    }

    /// Deserializes one TOML table (a section or a model) into `T`. Unknown
    /// keys are reported and removed first; then each key whose value does
    /// not fit is reported and removed in turn, so one bad key never hides
    /// another. Returns the value and the keys removed for a bad value, or
    /// `None` when the table cannot be read at all (its error is recorded).
    fn table<T: DeserializeOwned>(
        &mut self,
        prefix: &str,
        what: &str,
        mut value: Spanned<DeValue<'_>>,
    ) -> Option<(T, Vec<String>)> {
        let known = struct_keys::<T>();
        let table = table_mut(&mut value)?;
        let unknown: Vec<(String, std::ops::Range<usize>)> = table
            .iter()
            .filter(|(k, _)| !known.contains(&k.get_ref().as_ref()))
            .map(|(k, _)| (k.get_ref().to_string(), k.span()))
            .collect();
        for (key, span) in unknown {
            table.remove(key.as_str());
            let msg = unknown_key_message(&key, what, known);
            self.push(key_path(prefix, &key), span, &msg);
        }
        let mut bad = Vec::new();
        loop {
            let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
                Ok(v) => return Some((v, bad)),
                Err(e) => e,
            };
            let pos = e.span().map_or(value.span().start, |s| s.start);
            let field = path_at(prefix.to_string(), value.get_ref(), pos);
            let mut msg = e.message().to_string();
            if msg.starts_with("unknown field") {
                msg.push_str("; remove it or fix its spelling");
            }
            let error = FieldError::new(field, located(self.text, e.span(), &msg));
            self.found.push((pos, error));
            // Drop the key holding the bad value and read the rest again.
            // Each round removes a key, so this ends.
            let table = table_mut(&mut value)?;
            let culprit = e.span().and(
                table
                    .iter()
                    .find(|(k, v)| inside(k.span(), pos) || inside(v.span(), pos))
                    .map(|(k, _)| k.get_ref().to_string()),
            )?;
            table.remove(culprit.as_str());
            bad.push(culprit);
        }
    }
}

fn table_mut<'a, 'i>(value: &'a mut Spanned<DeValue<'i>>) -> Option<&'a mut DeTable<'i>> {
    match value.get_mut() {
        DeValue::Table(table) => Some(table),
        _ => None,
    }
}

/// The keys serde accepts for the struct `T`, read from its derived
/// `Deserialize`, so the unknown-key check can never drift from the structs.
fn struct_keys<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};

    struct Grab(&'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for &mut Grab {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(Self::Error::custom("only the field names were wanted"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    let mut grab = Grab(&[]);
    // Always an error: `Grab` only records the names.
    let _ = T::deserialize(&mut grab);
    grab.0
}

/// `unknown field `x` in [table]; did you mean `y`? ...`, listing the keys
/// the table takes.
fn unknown_key_message(key: &str, table: &str, known: &[&str]) -> String {
    let hint = closest(key, known)
        .map(|k| format!("did you mean `{k}`? "))
        .unwrap_or_default();
    let list = known
        .iter()
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "unknown field `{key}` in {table}; {hint}the valid keys are {list}; remove it or fix \
         its spelling"
    )
}

/// The known key `key` was most likely meant to be: a small edit away, or
/// one that starts with it (`connect` → `connect_ms`).
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let key = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&key, k), *k))
        .filter(|(d, k)| *d <= 2 || (key.len() >= 3 && (k.starts_with(&key) || key.starts_with(k))))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, in chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Whether byte `pos` is within `span` (or at its start, for empty spans).
fn inside(span: std::ops::Range<usize>, pos: usize) -> bool {
    span.contains(&pos) || span.start == pos
}

/// The deepest key path under `prefix` whose key or value contains byte `pos`.
fn path_at(prefix: String, value: &DeValue<'_>, pos: usize) -> String {
    match value {
        DeValue::Table(table) => {
            for (k, v) in table.iter() {
                if inside(k.span(), pos) {
                    return key_path(&prefix, k.get_ref());
                }
                if inside(v.span(), pos) {
                    return path_at(key_path(&prefix, k.get_ref()), v.get_ref(), pos);
                }
            }
        }
        DeValue::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if inside(v.span(), pos) {
                    return path_at(format!("{prefix}[{i}]"), v.get_ref(), pos);
                }
            }
        }
        _ => {}
    }
    prefix
}

/// `prefix.key`, or `prefix["odd key"]` when the key is not a bare word.
fn key_path(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (prefix.is_empty(), bare) {
        (true, true) => key.to_string(),
        (true, false) => format!("[{key:?}]"),
        (false, true) => format!("{prefix}.{key}"),
        (false, false) => format!("{prefix}[{key:?}]"),
    }
}

/// `line L, column C: message`, on one line.
fn located(text: &str, span: Option<std::ops::Range<usize>>, message: &str) -> String {
    let message = message.trim().replace('\n', "; ");
    let Some(span) = span else {
        return message;
    };
    let before = text.get(..span.start.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}: {message}")
}

// ---------------------------------------------------------------------------
// Environment overrides
// ---------------------------------------------------------------------------

fn apply_env(raw: &mut RawConfig, env: &dyn Fn(&str) -> Option<String>, errs: &mut Errs) {
    let get = |name: &str| env(name).filter(|v| !v.is_empty());
    for (var, target, example) in [
        (
            "GATEWAY_MAX_QUEUE_SIZE",
            &mut raw.gateway.max_queue_size,
            200,
        ),
        (
            "GATEWAY_MAX_CONCURRENT",
            &mut raw.gateway.max_concurrent,
            50,
        ),
    ] {
        if let Some(v) = get(var) {
            match v.parse::<usize>() {
                Ok(0) => errs.add(
                    var,
                    format!("{v:?} must be greater than 0; set it to a number > 0, e.g. {example}"),
                ),
                Ok(n) => *target = n,
                Err(_) => errs.add(
                    var,
                    format!("{v:?} is not a whole number; set it to a number > 0, e.g. {example}"),
                ),
            }
        }
    }
    if let Some(v) = get("LOG_LEVEL") {
        match v.parse::<LogLevel>() {
            Ok(_) => raw.gateway.log_level = v,
            Err(msg) => errs.add("LOG_LEVEL", msg),
        }
    }
    if let Some(v) = get("GATEWAY_LISTEN") {
        match parse_listen(&v) {
            Ok(_) => raw.gateway.listen = v,
            Err(msg) => errs.add("GATEWAY_LISTEN", msg),
        }
    }
}

// ---------------------------------------------------------------------------
// Validation: RawConfig → Config
// ---------------------------------------------------------------------------

fn validate(raw: RawConfig) -> Result<Config, ConfigErrors> {
    let mut errs = Errs::default();
    let gateway = gateway_settings(&raw.gateway, &mut errs);
    let timeouts = timeouts(&raw.timeouts, &mut errs);
    let retry = retry(&raw.retry, &mut errs);
    for (i, &mib) in raw.gpus.vram_mib.iter().enumerate() {
        if mib == 0 {
            errs.add(
                format!("gpus.vram_mib[{i}]"),
                "must be greater than 0; give GPU's total memory in MiB, e.g. 81920 for an 80 GiB GPU",
            );
        }
    }
    let docker_host = Some(raw.docker.host.clone()).filter(|h| !h.is_empty());
    let models = models(&raw, &gateway, &mut errs);
    if !errs.0.is_empty() {
        return Err(ConfigErrors(errs.0));
    }
    let raw = effective(raw, &models);
    Ok(Config {
        gpu_vram_mib: raw.gpus.vram_mib.clone(),
        raw,
        gateway,
        timeouts,
        retry,
        docker_host,
        models,
    })
}

/// Fills the per-model values that default from elsewhere into the raw
/// config, so that `redacted_json` shows what is actually in effect.
fn effective(mut raw: RawConfig, models: &[ModelSpec]) -> RawConfig {
    for (r, m) in raw.models.iter_mut().zip(models) {
        r.upstream_model = Some(m.upstream_model.clone());
        r.max_concurrent = Some(m.max_concurrent);
        r.max_queue_size = Some(m.max_queue_size);
        match &m.runtime {
            RuntimeSpec::Static { .. } => {}
            RuntimeSpec::Process { env, .. } => r.env = Some(env.clone()),
            RuntimeSpec::Docker {
                args,
                container_port,
                env,
                ..
            } => {
                r.args = Some(args.clone());
                r.container_port = Some(*container_port);
                r.env = Some(env.clone());
            }
        }
    }
    raw
}

/// Reports `value == 0`; returns it unchanged either way (never clamped).
/// `unit` follows the example, e.g. "(milliseconds)".
fn positive<T: Copy + PartialEq + Default + fmt::Display>(
    errs: &mut Errs,
    field: &str,
    value: T,
    example: T,
    unit: &str,
) -> T {
    if value == T::default() {
        errs.add(
            field,
            format!("must be greater than 0; set it to e.g. {example} {unit}"),
        );
    }
    value
}

fn gateway_settings(g: &RawGateway, errs: &mut Errs) -> GatewaySettings {
    let d = RawGateway::default();
    let listen = parse_listen(&g.listen).unwrap_or_else(|msg| {
        errs.add("gateway.listen", msg);
        SocketAddr::from(([127, 0, 0, 1], 8080))
    });
    if g.workers > MAX_WORKERS {
        errs.add(
            "gateway.workers",
            format!(
                "{} is more than {MAX_WORKERS} data-plane threads; use 0 (one per CPU core) or a \
                 number up to {MAX_WORKERS}",
                g.workers
            ),
        );
    }
    let driver = g.driver.parse().unwrap_or_else(|msg| {
        errs.add("gateway.driver", msg);
        Driver::Auto
    });
    let log_level = g.log_level.parse().unwrap_or_else(|msg| {
        errs.add("gateway.log_level", msg);
        LogLevel::Info
    });
    let log_format = g.log_format.parse().unwrap_or_else(|msg| {
        errs.add("gateway.log_format", msg);
        LogFormat::Text
    });
    let admin_token = if g.admin_token.is_empty() {
        None
    } else {
        if g.admin_token.chars().any(char::is_whitespace) {
            errs.add(
                "gateway.admin_token",
                "contains whitespace, which cannot be sent in a bearer token; remove it \
                 (or set admin_token = \"\" to disable the admin API's token)",
            );
        }
        Some(g.admin_token.clone())
    };
    for (i, key) in g.api_keys.iter().enumerate() {
        // Never echo the key itself: error messages end up in logs.
        if key.is_empty() {
            errs.add(
                format!("gateway.api_keys[{i}]"),
                "is empty, which would match a missing key; remove the entry",
            );
        } else if key.chars().any(char::is_whitespace) {
            errs.add(
                format!("gateway.api_keys[{i}]"),
                "contains whitespace, which cannot be sent in a bearer token; remove it",
            );
        }
    }
    GatewaySettings {
        listen,
        workers: g.workers,
        driver,
        log_level,
        log_format,
        max_queue_size: positive(
            errs,
            "gateway.max_queue_size",
            g.max_queue_size,
            d.max_queue_size,
            "(requests that may wait per model)",
        ),
        max_concurrent: positive(
            errs,
            "gateway.max_concurrent",
            g.max_concurrent,
            d.max_concurrent,
            "(requests in flight per model)",
        ),
        queue_timeout: Duration::from_millis(positive(
            errs,
            "gateway.queue_timeout_ms",
            g.queue_timeout_ms,
            d.queue_timeout_ms,
            "(milliseconds)",
        )),
        max_body_bytes: positive(
            errs,
            "gateway.max_body_bytes",
            g.max_body_bytes,
            d.max_body_bytes,
            "(bytes)",
        ),
        max_header_bytes: positive(
            errs,
            "gateway.max_header_bytes",
            g.max_header_bytes,
            d.max_header_bytes,
            "(bytes)",
        ),
        admin_token,
        api_keys: g.api_keys.clone(),
        // 0 is allowed: stop without waiting for in-flight requests.
        shutdown_grace: Duration::from_secs(g.shutdown_grace_s),
    }
}

fn timeouts(t: &RawTimeouts, errs: &mut Errs) -> Timeouts {
    let d = RawTimeouts::default();
    let mut ms = |field: &str, value: u64, example: u64| {
        Duration::from_millis(positive(
            errs,
            &format!("timeouts.{field}"),
            value,
            example,
            "(milliseconds)",
        ))
    };
    Timeouts {
        connect: ms("connect_ms", t.connect_ms, d.connect_ms),
        first_byte: ms("first_byte_ms", t.first_byte_ms, d.first_byte_ms),
        idle: ms("idle_ms", t.idle_ms, d.idle_ms),
        header_read: ms("header_read_ms", t.header_read_ms, d.header_read_ms),
        client_idle: ms("client_idle_ms", t.client_idle_ms, d.client_idle_ms),
        pool_idle: ms("pool_idle_ms", t.pool_idle_ms, d.pool_idle_ms),
    }
}

fn retry(r: &RawRetry, errs: &mut Errs) -> Retry {
    if r.attempts == 0 {
        errs.add(
            "retry.attempts",
            "must be at least 1 (it counts the first attempt too); use 1 to never retry",
        );
    }
    if !r.multiplier.is_finite() || r.multiplier < 1.0 {
        errs.add(
            "retry.multiplier",
            format!(
                "{} is not allowed; it must be a finite number >= 1.0 so backoff never shrinks, \
                 e.g. 1.5 (1.0 = constant backoff)",
                r.multiplier
            ),
        );
    }
    Retry {
        attempts: r.attempts,
        // 0 is allowed: retry immediately.
        backoff: Duration::from_millis(r.backoff_ms),
        multiplier: r.multiplier,
    }
}

/// `IP:PORT`, or `localhost:PORT` (resolved). Other host names are refused
/// so that what we bind to is never a DNS surprise.
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let hint = "use IP:PORT, e.g. \"127.0.0.1:8080\" (this host only) or \"0.0.0.0:8080\" \
                (all interfaces)";
    match s.rsplit_once(':') {
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => {
            let port: u16 = port
                .parse()
                .map_err(|_| format!("{s:?} has an invalid port {port:?}; {hint}"))?;
            resolve(host, port).map_err(|msg| format!("{s:?}: {msg}; {hint}"))
        }
        _ => Err(format!("{s:?} is not a socket address; {hint}")),
    }
}

/// Resolves `host`, preferring IPv4: `localhost` often lists `::1` first,
/// while vLLM listens on IPv4 (0.0.0.0) by default.
fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host {host:?} ({e})"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("host {host:?} resolved to no addresses"))
}

/// Why `name` is not a usable model name or alias, if it is not.
fn name_problem(name: &str) -> Option<String> {
    const ALLOWED: &str = "letters, digits and - _ . : / @";
    if name.is_empty() {
        return Some(format!(
            "must not be empty; use the name clients send as \"model\", e.g. \"llama-8b\" \
             ({ALLOWED})"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.:/@".contains(*c)))
    {
        return Some(format!("{name:?} contains {c:?}; use only {ALLOWED}"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Some(format!("{name:?} must start with a letter or a digit"));
    }
    if name.ends_with('/') || name.contains("//") {
        return Some(format!(
            "{name:?} must not end with \"/\" or contain \"//\"; write e.g. \"org/model\""
        ));
    }
    None
}

/// How paths name model `i`: by its name, unless the name is unusable or
/// shared (`names` holds every model's name), where the index is the only
/// unambiguous handle.
fn model_label(i: usize, name: &str, names: &[&str]) -> String {
    if name_problem(name).is_none() && names.iter().filter(|n| **n == name).count() == 1 {
        format!("models[{name:?}]")
    } else {
        format!("models[{i}]")
    }
}

fn model_labels(models: &[RawModel]) -> Vec<String> {
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    names
        .iter()
        .enumerate()
        .map(|(i, name)| model_label(i, name, &names))
        .collect()
}

fn models(raw: &RawConfig, gw: &GatewaySettings, errs: &mut Errs) -> Vec<ModelSpec> {
    let labels = model_labels(&raw.models);

    // Every name and alias must be unique: a request's "model" picks one.
    let mut seen: HashMap<&str, String> = HashMap::new();
    for (i, m) in raw.models.iter().enumerate() {
        let name_field = format!("models[{i}].name");
        if let Some(p) = name_problem(&m.name) {
            errs.add(&name_field, p);
        }
        let mut places = vec![(m.name.as_str(), name_field)];
        for (j, alias) in m.aliases.iter().enumerate() {
            let field = format!("{}.aliases[{j}]", labels[i]);
            if let Some(p) = name_problem(alias) {
                errs.add(&field, p);
            }
            places.push((alias.as_str(), field));
        }
        for (n, field) in places {
            if n.is_empty() {
                continue;
            }
            match seen.get(n) {
                Some(first) => errs.add(
                    &field,
                    format!(
                        "{n:?} is already used by {first}; every model name and alias must be \
                         unique, rename one of them"
                    ),
                ),
                None => {
                    seen.insert(n, field);
                }
            }
        }
    }

    raw.models
        .iter()
        .zip(&labels)
        .map(|(m, label)| model(m, label, raw, gw, errs))
        .collect()
}

fn model(
    m: &RawModel,
    label: &str,
    raw: &RawConfig,
    gw: &GatewaySettings,
    errs: &mut Errs,
) -> ModelSpec {
    let field = |key: &str| format!("{label}.{key}");
    let upstream_model = match &m.upstream_model {
        None => m.name.clone(),
        Some(u) if u.is_empty() => {
            errs.add(
                field("upstream_model"),
                "must not be empty; remove the key to send the model's name upstream",
            );
            String::new()
        }
        Some(u) => u.clone(),
    };
    let runtime = runtime(m, label, errs);
    let managed = !matches!(runtime, RuntimeSpec::Static { .. });
    if managed {
        gpu_fit(m, label, &raw.gpus.vram_mib, errs);
    }
    if m.pinned && m.idle_unload_s > 0 {
        errs.add(
            field("idle_unload_s"),
            "a pinned model is never unloaded; set idle_unload_s = 0 or pinned = false",
        );
    }
    if !m.health_path.starts_with('/') || m.health_path.chars().any(char::is_whitespace) {
        errs.add(
            field("health_path"),
            format!(
                "{:?} must be a path starting with \"/\" without spaces, e.g. \"/health\"",
                m.health_path
            ),
        );
    }
    let startup = positive(
        errs,
        &field("startup_timeout_s"),
        m.startup_timeout_s,
        900,
        "(seconds)",
    );
    let max_concurrent = match m.max_concurrent {
        Some(n) => positive(
            errs,
            &field("max_concurrent"),
            n,
            gw.max_concurrent,
            "(requests in flight), or remove the key to use gateway.max_concurrent",
        ),
        None => gw.max_concurrent,
    };
    let max_queue_size = match m.max_queue_size {
        Some(n) => positive(
            errs,
            &field("max_queue_size"),
            n,
            gw.max_queue_size,
            "(requests that may wait), or remove the key to use gateway.max_queue_size",
        ),
        None => gw.max_queue_size,
    };
    ModelSpec {
        name: m.name.clone(),
        aliases: m.aliases.clone(),
        upstream_model,
        runtime,
        vram_mib: m.vram_mib,
        gpus: m.gpus.clone(),
        pinned: m.pinned,
        preload: m.preload,
        idle_unload: Some(m.idle_unload_s)
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        startup_timeout: Duration::from_secs(startup),
        health_path: m.health_path.clone(),
        max_concurrent,
        max_queue_size,
    }
}

/// GPU indices must exist and the model's VRAM must fit the smallest GPU it
/// lists. Only for models the gateway starts; static models are not ours to
/// place.
fn gpu_fit(m: &RawModel, label: &str, vram: &[u64], errs: &mut Errs) {
    let mut seen = HashSet::new();
    for (k, &gpu) in m.gpus.iter().enumerate() {
        let field = format!("{label}.gpus[{k}]");
        if gpu >= vram.len() {
            errs.add(
                field,
                format!(
                    "GPU {gpu} does not exist: [gpus] vram_mib lists {} GPU(s), so valid \
                     indices are below {}; use an existing index or add the GPU to [gpus] \
                     vram_mib",
                    vram.len(),
                    vram.len()
                ),
            );
        } else if !seen.insert(gpu) {
            errs.add(
                field,
                format!("GPU {gpu} is listed twice; list each GPU once"),
            );
        }
    }
    if m.vram_mib > 0 && m.gpus.is_empty() {
        errs.add(
            format!("{label}.gpus"),
            format!(
                "is empty but vram_mib = {}; list the GPUs the model runs on, e.g. gpus = [0]",
                m.vram_mib
            ),
        );
    }
    let smallest = m
        .gpus
        .iter()
        .filter_map(|&g| vram.get(g).map(|&mib| (g, mib)))
        .filter(|&(_, mib)| mib > 0)
        .min_by_key(|&(_, mib)| mib);
    if let Some((gpu, mib)) = smallest {
        if m.vram_mib > mib {
            errs.add(
                format!("{label}.vram_mib"),
                format!(
                    "{} MiB does not fit on GPU {gpu}, which has {mib} MiB in total; lower \
                     vram_mib or run the model on larger GPUs",
                    m.vram_mib
                ),
            );
        }
    }
}

fn runtime(m: &RawModel, label: &str, errs: &mut Errs) -> RuntimeSpec {
    let field = |key: &str| format!("{label}.{key}");
    let mut foreign = |present: bool, key: &str, owner: &str| {
        if present {
            errs.add(
                field(key),
                format!(
                    "only used by runtime = {owner}, but this model has runtime = {:?}; remove \
                     it or change runtime",
                    m.runtime
                ),
            );
        }
    };
    let env_field = |errs: &mut Errs| env_checked(m, label, errs);
    match m.runtime.as_str() {
        "static" => {
            foreign(m.command.is_some(), "command", "\"process\"");
            foreign(m.image.is_some(), "image", "\"docker\"");
            foreign(m.args.is_some(), "args", "\"docker\"");
            foreign(m.container_port.is_some(), "container_port", "\"docker\"");
            foreign(m.env.is_some(), "env", "\"process\" or \"docker\"");
            let endpoints = m.endpoints.as_deref().unwrap_or_default();
            if endpoints.is_empty() {
                errs.add(
                    field("endpoints"),
                    "a static model needs at least one already-running server, e.g. \
                     endpoints = [\"http://127.0.0.1:8001\"]",
                );
            }
            let endpoints = endpoints
                .iter()
                .enumerate()
                .filter_map(|(k, url)| match parse_endpoint(url) {
                    Ok(e) => Some(e),
                    Err(msg) => {
                        errs.add(format!("{label}.endpoints[{k}]"), msg);
                        None
                    }
                })
                .collect();
            RuntimeSpec::Static { endpoints }
        }
        "process" => {
            foreign(m.endpoints.is_some(), "endpoints", "\"static\"");
            foreign(m.image.is_some(), "image", "\"docker\"");
            foreign(m.args.is_some(), "args", "\"docker\"");
            foreign(m.container_port.is_some(), "container_port", "\"docker\"");
            let command = m.command.clone().unwrap_or_default();
            if command.is_empty() {
                errs.add(
                    field("command"),
                    "a process model needs the command that starts its server, e.g. \
                     command = [\"vllm\", \"serve\", \"<model>\", \"--port\", \"{port}\"]",
                );
            } else {
                if command[0].trim().is_empty() {
                    errs.add(
                        format!("{label}.command[0]"),
                        "the program to run must not be empty, e.g. \"vllm\"",
                    );
                }
                if !command.iter().any(|a| a.contains("{port}")) {
                    errs.add(
                        field("command"),
                        "no element contains \"{port}\": the gateway picks a free port and \
                         puts it there, which is how it tells the server where to listen; add \
                         e.g. \"--port\", \"{port}\"",
                    );
                }
            }
            RuntimeSpec::Process {
                command,
                env: env_field(errs),
            }
        }
        "docker" => {
            foreign(m.endpoints.is_some(), "endpoints", "\"static\"");
            foreign(m.command.is_some(), "command", "\"process\"");
            let image = m.image.clone().unwrap_or_default();
            if image.trim().is_empty() {
                errs.add(
                    field("image"),
                    "a docker model needs the image to run, e.g. image = \
                     \"vllm/vllm-openai:latest\"",
                );
            }
            let container_port = m.container_port.unwrap_or(DEFAULT_CONTAINER_PORT);
            if container_port == 0 {
                errs.add(
                    field("container_port"),
                    "must be greater than 0: the port the server listens on inside the \
                     container, e.g. 8000 (the vllm/vllm-openai default)",
                );
            }
            RuntimeSpec::Docker {
                image,
                args: m.args.clone().unwrap_or_default(),
                container_port,
                env: env_field(errs),
            }
        }
        other => {
            errs.add(
                field("runtime"),
                format!(
                    "{other:?} is not a runtime; use \"static\" (servers you run yourself, \
                     listed in endpoints), \"process\" (the gateway runs command) or \"docker\" \
                     (the gateway runs image)"
                ),
            );
            RuntimeSpec::Static {
                endpoints: Vec::new(),
            }
        }
    }
}

/// The model's env table, with names a process can actually receive.
fn env_checked(m: &RawModel, label: &str, errs: &mut Errs) -> BTreeMap<String, String> {
    let env = m.env.clone().unwrap_or_default();
    for (key, value) in &env {
        let field = key_path(&format!("{label}.env"), key);
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            errs.add(
                field,
                "is not a valid environment variable name; use e.g. HF_TOKEN (no \"=\")",
            );
        } else if value.contains('\0') {
            // Do not echo the value: env often holds tokens.
            errs.add(field, "the value contains a NUL character; remove it");
        }
    }
    env
}

/// `http://host:port[/]` → address to connect to plus the Host header.
fn parse_endpoint(url: &str) -> Result<EndpointSpec, String> {
    let example = "e.g. \"http://127.0.0.1:8001\"";
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(format!(
            "{url:?}: TLS upstreams are not supported; use http:// (vLLM on this host is \
             reached over plain HTTP), {example}"
        ));
    }
    let rest = match url.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("http://") => &url[7..],
        _ => {
            return Err(format!(
                "{url:?} is not an http://host:port URL; write it as {example}"
            ))
        }
    };
    let (authority, tail) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if tail.starts_with('?') || tail.starts_with('#') || tail.contains(['?', '#']) {
        return Err(format!(
            "{url:?} has a query or fragment; write just \"http://{authority}\""
        ));
    }
    if !tail.is_empty() && tail != "/" {
        return Err(format!(
            "{url:?} has the path {tail:?}; drop the path (write \"http://{authority}\"): the \
             gateway forwards the client's own path, e.g. /v1/chat/completions, unchanged"
        ));
    }
    if authority.contains('@') {
        return Err(format!(
            "{url:?} contains user info (\"user@\"); it is not supported, remove it"
        ));
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        // [IPv6]:port
        match after.split_once(']') {
            Some((ip, rest)) => (ip, rest.strip_prefix(':')),
            None => return Err(format!("{url:?} has an unclosed \"[\"; {example}")),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host; {example}"));
    }
    let port = match port {
        None => {
            return Err(format!(
                "{url:?} has no port; write it explicitly, e.g. \"http://{authority}:8000\""
            ))
        }
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{url:?} has an invalid port {p:?}; use 1-65535")),
        },
    };
    let addr = resolve(host, port)
        .map_err(|msg| format!("{url:?}: {msg}; use an IP address or a name this host knows"))?;
    Ok(EndpointSpec {
        url: url.to_string(),
        addr,
        authority: authority.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        parse_str(text, &no_env)
    }

    fn parse_ok(text: &str) -> Config {
        match parse(text) {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got:\n{e}\n--- for:\n{text}"),
        }
    }

    fn errors_env(text: &str, vars: &[(&str, &str)]) -> Vec<FieldError> {
        let env = |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        };
        match parse_str(text, &env) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e.0,
        }
    }

    fn errors(text: &str) -> Vec<FieldError> {
        errors_env(text, &[])
    }

    fn has(errs: &[FieldError], field: &str, needle: &str) -> bool {
        errs.iter()
            .any(|e| e.field == field && e.message.contains(needle))
    }

    /// Asserts that `text` is rejected with an error on `field` whose
    /// message contains `needle`.
    fn assert_error(text: &str, field: &str, needle: &str) {
        let errs = errors(text);
        assert!(
            has(&errs, field, needle),
            "no error on {field} containing {needle:?}; got:\n{}\n--- for:\n{text}",
            ConfigErrors(errs)
        );
    }

    /// A minimal valid static model named `m`.
    const STATIC_M: &str = "[[models]]\nname = \"m\"\nendpoints = [\"http://127.0.0.1:8001\"]\n";

    fn with_model(extra: &str) -> String {
        format!("{STATIC_M}{extra}\n")
    }

    fn process_model(extra: &str) -> String {
        format!(
            "[[models]]\nname = \"p\"\nruntime = \"process\"\n\
             command = [\"vllm\", \"serve\", \"x\", \"--port\", \"{{port}}\"]\n{extra}\n"
        )
    }

    fn docker_model(extra: &str) -> String {
        format!(
            "[[models]]\nname = \"d\"\nruntime = \"docker\"\nimage = \"vllm/vllm-openai:latest\"\n{extra}\n"
        )
    }

    #[test]
    fn empty_file_gives_all_defaults() {
        let c = parse_ok("");
        assert_eq!(c.raw, RawConfig::default());
        let g = &c.gateway;
        assert_eq!(g.listen, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(g.workers, 0);
        assert_eq!(g.driver, Driver::Auto);
        assert_eq!(g.log_level, LogLevel::Info);
        assert_eq!(g.log_format, LogFormat::Text);
        assert_eq!(g.max_queue_size, 200);
        assert_eq!(g.max_concurrent, 50);
        assert_eq!(g.queue_timeout, Duration::from_secs(60));
        assert_eq!(g.max_body_bytes, 33_554_432);
        assert_eq!(g.max_header_bytes, 65_536);
        assert_eq!(g.admin_token, None);
        assert!(g.api_keys.is_empty());
        assert_eq!(g.shutdown_grace, Duration::from_secs(30));
        assert_eq!(
            c.timeouts,
            Timeouts {
                connect: Duration::from_millis(2000),
                first_byte: Duration::from_millis(300_000),
                idle: Duration::from_millis(60_000),
                header_read: Duration::from_millis(10_000),
                client_idle: Duration::from_millis(75_000),
                pool_idle: Duration::from_millis(4_000),
            }
        );
        assert_eq!(
            c.retry,
            Retry {
                attempts: 3,
                backoff: Duration::from_millis(1000),
                multiplier: 1.5
            }
        );
        assert_eq!(c.gpu_vram_mib, vec![81_920]);
        assert_eq!(c.docker_host, None);
        assert!(c.models.is_empty());
        // Empty sections are the same as missing ones.
        let c2 = parse_ok("[gateway]\n[timeouts]\n[retry]\n[gpus]\n[docker]\n");
        assert_eq!(c, c2);
    }

    const FULL: &str = r#"
[gateway]
listen = "0.0.0.0:9000"
workers = 4
driver = "epoll"
log_level = "debug"
log_format = "json"
max_queue_size = 100
max_concurrent = 20
queue_timeout_ms = 5000
max_body_bytes = 1048576
admin_token = "admin-secret"
api_keys = ["key-one", "key-two"]
max_header_bytes = 8192
shutdown_grace_s = 0

[timeouts]
connect_ms = 100
first_byte_ms = 200
idle_ms = 300
header_read_ms = 400
client_idle_ms = 500
pool_idle_ms = 600

[retry]
attempts = 1
backoff_ms = 0
multiplier = 2

[gpus]
vram_mib = [81920, 49152]

[docker]
host = "unix:///run/docker.sock"

[[models]]
name = "llama-8b"
aliases = ["llama3", "meta-llama/Llama-3.1-8B@v1:latest"]
upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
endpoints = ["http://127.0.0.1:8001", "http://localhost:8002/", "http://[::1]:8003"]
vram_mib = 999999
max_concurrent = 7

[[models]]
name = "qwen"
runtime = "process"
command = ["vllm", "serve", "Qwen/Qwen2.5-7B", "--port={port}"]
env = { HF_TOKEN = "hf_secret", CUDA_VISIBLE_DEVICES = "1" }
vram_mib = 40000
gpus = [1]
preload = true
idle_unload_s = 600
startup_timeout_s = 300
health_path = "/v1/models"
max_queue_size = 3

[[models]]
name = "mistral"
runtime = "docker"
image = "vllm/vllm-openai:v0.6.0"
args = ["--model", "mistralai/Mistral-7B"]
container_port = 8080
vram_mib = 81920
gpus = [0]
pinned = true
"#;

    #[test]
    fn full_example_parses_to_typed_values() {
        let c = parse_ok(FULL);
        assert_eq!(
            c.gateway,
            GatewaySettings {
                listen: "0.0.0.0:9000".parse().unwrap(),
                workers: 4,
                driver: Driver::Epoll,
                log_level: LogLevel::Debug,
                log_format: LogFormat::Json,
                max_queue_size: 100,
                max_concurrent: 20,
                queue_timeout: Duration::from_millis(5000),
                max_body_bytes: 1_048_576,
                max_header_bytes: 8192,
                admin_token: Some("admin-secret".into()),
                api_keys: vec!["key-one".into(), "key-two".into()],
                shutdown_grace: Duration::ZERO,
            }
        );
        assert_eq!(
            c.timeouts,
            Timeouts {
                connect: Duration::from_millis(100),
                first_byte: Duration::from_millis(200),
                idle: Duration::from_millis(300),
                header_read: Duration::from_millis(400),
                client_idle: Duration::from_millis(500),
                pool_idle: Duration::from_millis(600),
            }
        );
        assert_eq!(
            c.retry,
            Retry {
                attempts: 1,
                backoff: Duration::ZERO,
                multiplier: 2.0
            }
        );
        assert_eq!(c.gpu_vram_mib, vec![81920, 49152]);
        assert_eq!(c.docker_host.as_deref(), Some("unix:///run/docker.sock"));
        assert_eq!(c.models.len(), 3);

        let llama = &c.models[0];
        assert_eq!(llama.runtime_name(), "static");
        assert_eq!(
            *llama,
            ModelSpec {
                name: "llama-8b".into(),
                aliases: vec!["llama3".into(), "meta-llama/Llama-3.1-8B@v1:latest".into()],
                upstream_model: "meta-llama/Llama-3.1-8B-Instruct".into(),
                runtime: RuntimeSpec::Static {
                    endpoints: vec![
                        EndpointSpec {
                            url: "http://127.0.0.1:8001".into(),
                            addr: "127.0.0.1:8001".parse().unwrap(),
                            authority: "127.0.0.1:8001".into(),
                        },
                        EndpointSpec {
                            url: "http://localhost:8002/".into(),
                            // IPv4 preferred: vLLM listens on 0.0.0.0.
                            addr: "127.0.0.1:8002".parse().unwrap(),
                            authority: "localhost:8002".into(),
                        },
                        EndpointSpec {
                            url: "http://[::1]:8003".into(),
                            addr: "[::1]:8003".parse().unwrap(),
                            authority: "[::1]:8003".into(),
                        },
                    ]
                },
                // Static: vram_mib is kept but not checked against the GPUs.
                vram_mib: 999_999,
                gpus: vec![0],
                pinned: false,
                preload: false,
                idle_unload: None,
                startup_timeout: Duration::from_secs(900),
                health_path: "/health".into(),
                max_concurrent: 7,
                max_queue_size: 100,
            }
        );

        let qwen = &c.models[1];
        assert_eq!(qwen.runtime_name(), "process");
        assert_eq!(qwen.upstream_model, "qwen");
        assert_eq!(
            qwen.runtime,
            RuntimeSpec::Process {
                command: vec![
                    "vllm".into(),
                    "serve".into(),
                    "Qwen/Qwen2.5-7B".into(),
                    "--port={port}".into()
                ],
                env: BTreeMap::from([
                    ("CUDA_VISIBLE_DEVICES".to_string(), "1".to_string()),
                    ("HF_TOKEN".to_string(), "hf_secret".to_string()),
                ]),
            }
        );
        assert_eq!(qwen.vram_mib, 40000);
        assert_eq!(qwen.gpus, vec![1]);
        assert!(qwen.preload);
        assert_eq!(qwen.idle_unload, Some(Duration::from_secs(600)));
        assert_eq!(qwen.startup_timeout, Duration::from_secs(300));
        assert_eq!(qwen.health_path, "/v1/models");
        assert_eq!(qwen.max_concurrent, 20);
        assert_eq!(qwen.max_queue_size, 3);

        let mistral = &c.models[2];
        assert_eq!(mistral.runtime_name(), "docker");
        assert_eq!(
            mistral.runtime,
            RuntimeSpec::Docker {
                image: "vllm/vllm-openai:v0.6.0".into(),
                args: vec!["--model".into(), "mistralai/Mistral-7B".into()],
                container_port: 8080,
                env: BTreeMap::new(),
            }
        );
        assert!(mistral.pinned);
        assert_eq!(mistral.idle_unload, None);
    }

    #[test]
    fn docker_defaults() {
        let c = parse_ok(&docker_model(""));
        assert_eq!(
            c.models[0].runtime,
            RuntimeSpec::Docker {
                image: "vllm/vllm-openai:latest".into(),
                args: vec![],
                container_port: 8000,
                env: BTreeMap::new(),
            }
        );
    }

    #[test]
    fn effective_raw_round_trips_through_toml() {
        let c = parse_ok(FULL);
        let text = toml::to_string(&c.raw).unwrap();
        let again = parse_ok(&text);
        assert_eq!(c, again);
    }

    #[test]
    fn env_overrides_apply() {
        let env = |name: &str| {
            match name {
                "GATEWAY_MAX_QUEUE_SIZE" => Some("7"),
                "GATEWAY_MAX_CONCURRENT" => Some("9"),
                "LOG_LEVEL" => Some("trace"),
                "GATEWAY_LISTEN" => Some("0.0.0.0:1234"),
                _ => None,
            }
            .map(str::to_string)
        };
        let c = parse_str(&with_model("max_queue_size = 2"), &env).unwrap();
        assert_eq!(c.gateway.max_queue_size, 7);
        assert_eq!(c.gateway.max_concurrent, 9);
        assert_eq!(c.gateway.log_level, LogLevel::Trace);
        assert_eq!(c.gateway.listen, "0.0.0.0:1234".parse().unwrap());
        // The per-model default follows the env; an explicit override wins.
        assert_eq!(c.models[0].max_concurrent, 9);
        assert_eq!(c.models[0].max_queue_size, 2);
        let j = c.redacted_json();
        assert_eq!(j["gateway"]["max_queue_size"], 7);
        assert_eq!(j["gateway"]["max_concurrent"], 9);
        assert_eq!(j["gateway"]["log_level"], "trace");
        assert_eq!(j["gateway"]["listen"], "0.0.0.0:1234");
        assert_eq!(j["models"][0]["max_concurrent"], 9);
    }

    #[test]
    fn env_listen_accepts_localhost() {
        let env = |name: &str| (name == "GATEWAY_LISTEN").then(|| "localhost:8181".to_string());
        let c = parse_str("", &env).unwrap();
        assert_eq!(c.gateway.listen, "127.0.0.1:8181".parse().unwrap());
    }

    #[test]
    fn empty_env_values_are_unset() {
        let env = |_: &str| Some(String::new());
        let c = parse_str("", &env).unwrap();
        assert_eq!(c.raw, RawConfig::default());
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let errs = errors_env("", &[("GATEWAY_MAX_CONCURRENT", "abc")]);
        assert_eq!(
            errs,
            vec![FieldError::new(
                "GATEWAY_MAX_CONCURRENT",
                "\"abc\" is not a whole number; set it to a number > 0, e.g. 50"
            )]
        );
        let errs = errors_env(
            "",
            &[
                ("GATEWAY_MAX_QUEUE_SIZE", "-1"),
                ("GATEWAY_MAX_CONCURRENT", "0"),
                ("LOG_LEVEL", "INFO"),
                ("GATEWAY_LISTEN", "nowhere"),
            ],
        );
        assert_eq!(errs.len(), 4, "{}", ConfigErrors(errs.clone()));
        assert!(has(&errs, "GATEWAY_MAX_QUEUE_SIZE", "not a whole number"));
        assert!(has(&errs, "GATEWAY_MAX_CONCURRENT", "greater than 0"));
        assert!(has(&errs, "LOG_LEVEL", "\"error\", \"warn\", \"info\""));
        assert!(has(&errs, "GATEWAY_LISTEN", "IP:PORT"));
    }

    #[test]
    fn env_errors_are_reported_with_file_errors() {
        let errs = errors_env("[gateway]\nbogus = 1\n", &[("LOG_LEVEL", "loud")]);
        assert!(has(&errs, "gateway.bogus", "unknown field"));
        assert!(has(&errs, "LOG_LEVEL", "\"loud\""));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert_error("listen = \"x\"\n", "listen", "unknown top-level key");
        assert_error("[gatway]\n", "gatway", "unknown top-level key");
        assert_error(
            "[gateway]\nlisten = \"127.0.0.1:1\"\nworkerz = 2\n",
            "gateway.workerz",
            "line 3",
        );
        assert_error(
            "[timeouts]\nconnect = 1\n",
            "timeouts.connect",
            "unknown field",
        );
        assert_error("[retry]\ntries = 1\n", "retry.tries", "unknown field");
        assert_error("[gpus]\nvram = [1]\n", "gpus.vram", "unknown field");
        assert_error(
            "[docker]\nsocket = \"x\"\n",
            "docker.socket",
            "unknown field",
        );
        assert_error(
            &with_model("port = 1"),
            "models[\"m\"].port",
            "unknown field",
        );
        assert_error(
            "[[models]]\nendpoint = \"x\"\n",
            "models[0].endpoint",
            "unknown field `endpoint`",
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        assert_error(
            "[timeouts]\nconnect_ms = \"2s\"\n",
            "timeouts.connect_ms",
            "line 2",
        );
        assert_error("[gpus]\nvram_mib = [1, -5]\n", "gpus.vram_mib[1]", "-5");
        assert_error(
            &with_model("env = { A = 1 }"),
            "models[\"m\"].env.A",
            "expected a string",
        );
        assert_error(
            &docker_model("container_port = 70000"),
            "models[\"d\"].container_port",
            "70000",
        );
        assert_error("gateway = 1\n", "gateway", "must be a table");
        assert_error("[models]\nname = \"x\"\n", "models", "[[models]]");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        assert_error("[gateway]\nlisten = \n", FILE_FIELD, "line 2");
        assert_error("[gateway\n", FILE_FIELD, "line 1");
        // Duplicate keys are a TOML error too.
        assert_error(
            "[gateway]\nworkers = 1\nworkers = 2\n",
            FILE_FIELD,
            "line 3",
        );
    }

    #[test]
    fn listen_must_be_a_socket_address() {
        for bad in ["8080", "127.0.0.1", "example.com:80", "127.0.0.1:99999", ""] {
            assert_error(
                &format!("[gateway]\nlisten = {bad:?}\n"),
                "gateway.listen",
                "IP:PORT",
            );
        }
        let c = parse_ok("[gateway]\nlisten = \"localhost:8080\"\n");
        assert_eq!(c.gateway.listen, "127.0.0.1:8080".parse().unwrap());
        let c = parse_ok("[gateway]\nlisten = \"[::]:8080\"\n");
        assert_eq!(c.gateway.listen, "[::]:8080".parse().unwrap());
    }

    #[test]
    fn sizes_limits_and_timeouts_must_be_positive() {
        for (table, key) in [
            ("gateway", "max_queue_size"),
            ("gateway", "max_concurrent"),
            ("gateway", "queue_timeout_ms"),
            ("gateway", "max_body_bytes"),
            ("gateway", "max_header_bytes"),
            ("timeouts", "connect_ms"),
            ("timeouts", "first_byte_ms"),
            ("timeouts", "idle_ms"),
            ("timeouts", "header_read_ms"),
            ("timeouts", "client_idle_ms"),
            ("timeouts", "pool_idle_ms"),
        ] {
            assert_error(
                &format!("[{table}]\n{key} = 0\n"),
                &format!("{table}.{key}"),
                "greater than 0",
            );
        }
        for key in ["startup_timeout_s", "max_concurrent", "max_queue_size"] {
            assert_error(
                &with_model(&format!("{key} = 0")),
                &format!("models[\"m\"].{key}"),
                "greater than 0",
            );
        }
        // Zero is meaningful here.
        parse_ok("[retry]\nbackoff_ms = 0\n[gateway]\nshutdown_grace_s = 0\nworkers = 0\n");
    }

    #[test]
    fn retry_rules() {
        assert_error("[retry]\nattempts = 0\n", "retry.attempts", "at least 1");
        for bad in ["0.5", "0", "nan", "inf", "-1.0"] {
            assert_error(
                &format!("[retry]\nmultiplier = {bad}\n"),
                "retry.multiplier",
                ">= 1.0",
            );
        }
        assert_eq!(
            parse_ok("[retry]\nmultiplier = 1.0\n").retry.multiplier,
            1.0
        );
    }

    #[test]
    fn workers_are_capped_not_clamped() {
        assert_error("[gateway]\nworkers = 1025\n", "gateway.workers", "1024");
        assert_eq!(
            parse_ok("[gateway]\nworkers = 1024\n").gateway.workers,
            1024
        );
    }

    #[test]
    fn gpu_vram_entries_must_be_positive() {
        assert_error(
            "[gpus]\nvram_mib = [81920, 0]\n",
            "gpus.vram_mib[1]",
            "greater than 0",
        );
        // No GPUs at all is fine for a host with static models only.
        let c = parse_ok(&format!("[gpus]\nvram_mib = []\n{STATIC_M}"));
        assert!(c.gpu_vram_mib.is_empty());
    }

    #[test]
    fn enums_list_allowed_values() {
        assert_error(
            "[gateway]\ndriver = \"uring\"\n",
            "gateway.driver",
            "\"auto\", \"io_uring\", \"epoll\"",
        );
        assert_error(
            "[gateway]\nlog_level = \"verbose\"\n",
            "gateway.log_level",
            "\"error\", \"warn\", \"info\", \"debug\", \"trace\"",
        );
        assert_error(
            "[gateway]\nlog_format = \"yaml\"\n",
            "gateway.log_format",
            "\"text\", \"json\"",
        );
        assert_eq!(
            parse_ok("[gateway]\ndriver = \"io_uring\"\n")
                .gateway
                .driver,
            Driver::IoUring
        );
    }

    #[test]
    fn enum_names_round_trip() {
        for (name, level) in LOG_LEVELS {
            assert_eq!(level.as_str(), *name);
            assert_eq!(name.parse::<LogLevel>(), Ok(*level));
        }
        for (name, d) in DRIVERS {
            assert_eq!(d.as_str(), *name);
            assert_eq!(name.parse::<Driver>(), Ok(*d));
        }
        for (name, f) in LOG_FORMATS {
            assert_eq!(f.as_str(), *name);
            assert_eq!(name.parse::<LogFormat>(), Ok(*f));
        }
        assert!("Info".parse::<LogLevel>().is_err());
    }

    #[test]
    fn model_names_are_checked() {
        let model = |name: &str| {
            format!("[[models]]\nname = {name:?}\nendpoints = [\"http://127.0.0.1:1\"]\n")
        };
        assert_error(&model(""), "models[0].name", "must not be empty");
        assert_error(&model("my model"), "models[0].name", "' '");
        assert_error(&model("a\tb"), "models[0].name", "'\\t'");
        assert_error(
            &model("/abs"),
            "models[0].name",
            "start with a letter or a digit",
        );
        assert_error(&model("org/"), "models[0].name", "must not end with \"/\"");
        assert_error(&model("a//b"), "models[0].name", "\"//\"");
        assert_error(&model("llama#1"), "models[0].name", "'#'");
        parse_ok(&model("meta-llama/Llama-3.1-8B_x:v1@rev"));
        // With a bad name, other fields fall back to the index.
        assert_error(
            "[[models]]\nname = \"a b\"\nendpoints = []\n",
            "models[0].endpoints",
            "at least one",
        );
        assert_error(
            &with_model("aliases = [\"x y\"]"),
            "models[\"m\"].aliases[0]",
            "' '",
        );
        assert_error(
            &with_model("aliases = [\"\"]"),
            "models[\"m\"].aliases[0]",
            "empty",
        );
        assert_error(
            &with_model("upstream_model = \"\""),
            "models[\"m\"].upstream_model",
            "remove the key",
        );
    }

    #[test]
    fn names_and_aliases_are_unique() {
        let text = format!("{STATIC_M}{STATIC_M}");
        assert_error(&text, "models[1].name", "already used by models[0].name");
        let text = format!(
            "{}[[models]]\nname = \"n\"\naliases = [\"a\", \"m\"]\nendpoints = [\"http://127.0.0.1:1\"]\n",
            with_model("aliases = [\"a\"]")
        );
        let errs = errors(&text);
        assert!(has(
            &errs,
            "models[\"n\"].aliases[0]",
            "already used by models[\"m\"].aliases[0]"
        ));
        assert!(has(
            &errs,
            "models[\"n\"].aliases[1]",
            "already used by models[0].name"
        ));
        // An alias equal to its own model's name is a duplicate too.
        assert_error(
            &with_model("aliases = [\"m\"]"),
            "models[\"m\"].aliases[0]",
            "models[0].name",
        );
        let text = format!(
            "{}[[models]]\nname = \"a\"\nendpoints = [\"http://127.0.0.1:1\"]\n",
            with_model("aliases = [\"a\"]")
        );
        assert_error(
            &text,
            "models[1].name",
            "already used by models[\"m\"].aliases[0]",
        );
    }

    #[test]
    fn static_runtime_rules() {
        assert_error(
            "[[models]]\nname = \"m\"\n",
            "models[\"m\"].endpoints",
            "at least one",
        );
        assert_error(
            "[[models]]\nname = \"m\"\nendpoints = []\n",
            "models[\"m\"].endpoints",
            "at least one",
        );
        assert_error(
            &with_model("command = [\"x\"]"),
            "models[\"m\"].command",
            "runtime = \"process\"",
        );
        assert_error(
            &with_model("image = \"x\""),
            "models[\"m\"].image",
            "runtime = \"docker\"",
        );
        assert_error(
            &with_model("args = []"),
            "models[\"m\"].args",
            "runtime = \"docker\"",
        );
        assert_error(
            &with_model("container_port = 1"),
            "models[\"m\"].container_port",
            "\"docker\"",
        );
        assert_error(
            &with_model("env = {}"),
            "models[\"m\"].env",
            "\"process\" or \"docker\"",
        );
        // vram_mib and gpus are ignored for static models.
        parse_ok(&with_model("vram_mib = 99999999\ngpus = [7]"));
    }

    #[test]
    fn endpoint_urls_are_checked() {
        let model = |url: &str| {
            format!("[[models]]\nname = \"m\"\nendpoints = [\"http://127.0.0.1:1\", {url:?}]\n")
        };
        let field = "models[\"m\"].endpoints[1]";
        assert_error(&model("http://127.0.0.1:8001/v1"), field, "drop");
        assert_error(
            &model("https://127.0.0.1:8001"),
            field,
            "TLS upstreams are not supported",
        );
        assert_error(
            &model("127.0.0.1:8001"),
            field,
            "not an http://host:port URL",
        );
        assert_error(
            &model("ftp://127.0.0.1:8001"),
            field,
            "not an http://host:port URL",
        );
        assert_error(&model("http://127.0.0.1"), field, "no port");
        assert_error(&model("http://127.0.0.1:0"), field, "invalid port");
        assert_error(&model("http://127.0.0.1:x"), field, "invalid port");
        assert_error(&model("http://:80"), field, "no host");
        assert_error(&model("http://u:p@127.0.0.1:80"), field, "user info");
        assert_error(&model("http://127.0.0.1:80?x=1"), field, "query");
        assert_error(&model("http://[::1:80"), field, "unclosed");
        assert_error(
            &model("http://no-such-host.invalid:8000"),
            field,
            "cannot resolve",
        );
        let c = parse_ok(&model("HTTP://localhost:8000/"));
        let RuntimeSpec::Static { endpoints } = &c.models[0].runtime else {
            panic!("not static")
        };
        assert_eq!(endpoints[1].authority, "localhost:8000");
        assert_eq!(endpoints[1].addr.port(), 8000);
    }

    #[test]
    fn process_runtime_rules() {
        parse_ok(&process_model(""));
        assert_error(
            "[[models]]\nname = \"p\"\nruntime = \"process\"\n",
            "models[\"p\"].command",
            "needs the command",
        );
        assert_error(
            "[[models]]\nname = \"p\"\nruntime = \"process\"\ncommand = []\n",
            "models[\"p\"].command",
            "needs the command",
        );
        assert_error(
            "[[models]]\nname = \"p\"\nruntime = \"process\"\ncommand = [\"vllm\", \"serve\"]\n",
            "models[\"p\"].command",
            "how it tells the server where to listen",
        );
        assert_error(
            "[[models]]\nname = \"p\"\nruntime = \"process\"\ncommand = [\"\", \"{port}\"]\n",
            "models[\"p\"].command[0]",
            "must not be empty",
        );
        assert_error(
            &process_model("endpoints = [\"http://127.0.0.1:1\"]"),
            "models[\"p\"].endpoints",
            "runtime = \"static\"",
        );
        assert_error(
            &process_model("image = \"x\""),
            "models[\"p\"].image",
            "runtime = \"docker\"",
        );
        assert_error(
            &process_model("args = [\"x\"]"),
            "models[\"p\"].args",
            "runtime = \"docker\"",
        );
        assert_error(
            &process_model("env = { \"A=B\" = \"x\" }"),
            "models[\"p\"].env[\"A=B\"]",
            "not a valid environment variable name",
        );
    }

    #[test]
    fn docker_runtime_rules() {
        assert_error(
            "[[models]]\nname = \"d\"\nruntime = \"docker\"\n",
            "models[\"d\"].image",
            "needs the image",
        );
        assert_error(
            &docker_model("container_port = 0"),
            "models[\"d\"].container_port",
            "greater than 0",
        );
        assert_error(
            &docker_model("endpoints = []"),
            "models[\"d\"].endpoints",
            "runtime = \"static\"",
        );
        assert_error(
            &docker_model("command = [\"{port}\"]"),
            "models[\"d\"].command",
            "runtime = \"process\"",
        );
        assert_error(
            "[[models]]\nname = \"x\"\nruntime = \"kubernetes\"\n",
            "models[\"x\"].runtime",
            "\"static\"",
        );
    }

    #[test]
    fn gpu_placement_rules() {
        let gpus = "[gpus]\nvram_mib = [81920, 40960]\n";
        assert_error(
            &format!("{gpus}{}", process_model("gpus = [2]")),
            "models[\"p\"].gpus[0]",
            "GPU 2 does not exist",
        );
        assert_error(
            &format!("{gpus}{}", docker_model("gpus = [0, 0]")),
            "models[\"d\"].gpus[1]",
            "listed twice",
        );
        // Must fit the smallest GPU the model is placed on.
        assert_error(
            &format!("{gpus}{}", process_model("gpus = [0, 1]\nvram_mib = 50000")),
            "models[\"p\"].vram_mib",
            "GPU 1, which has 40960 MiB",
        );
        assert_error(
            &format!("{gpus}{}", process_model("gpus = []\nvram_mib = 1")),
            "models[\"p\"].gpus",
            "is empty",
        );
        let c = parse_ok(&format!(
            "{gpus}{}",
            process_model("gpus = [0]\nvram_mib = 81920")
        ));
        assert_eq!(c.models[0].vram_mib, 81920);
    }

    #[test]
    fn per_model_rules() {
        assert_error(
            &with_model("health_path = \"health\""),
            "models[\"m\"].health_path",
            "\"/\"",
        );
        assert_error(
            &with_model("pinned = true\nidle_unload_s = 60"),
            "models[\"m\"].idle_unload_s",
            "never unloaded",
        );
        parse_ok(&with_model("pinned = true\nidle_unload_s = 0"));
    }

    #[test]
    fn secrets_are_checked_without_echoing_them() {
        let errs = errors(
            "[gateway]\nadmin_token = \"has space\"\napi_keys = [\"ok\", \"\", \"tab\\tkey\"]\n",
        );
        assert!(has(&errs, "gateway.admin_token", "whitespace"));
        assert!(has(&errs, "gateway.api_keys[1]", "empty"));
        assert!(has(&errs, "gateway.api_keys[2]", "whitespace"));
        let all = ConfigErrors(errs).to_string();
        assert!(
            !all.contains("has space") && !all.contains("tab\tkey"),
            "{all}"
        );
    }

    #[test]
    fn all_errors_are_reported() {
        let text = r#"
[gateway]
listen = "nope"
max_concurrent = 0
[timeouts]
idle_ms = 0
[retry]
attempts = 0
[[models]]
name = "a"
runtime = "process"
command = ["vllm"]
[[models]]
name = "a"
"#;
        let errs = errors(text);
        for field in [
            "gateway.listen",
            "gateway.max_concurrent",
            "timeouts.idle_ms",
            "retry.attempts",
            "models[0].command",
            "models[1].name",
            "models[1].endpoints",
        ] {
            assert!(
                errs.iter().any(|e| e.field == field),
                "missing {field} in:\n{}",
                ConfigErrors(errs.clone())
            );
        }
        // Parse errors in several sections and models are all reported too,
        // in file order, before the checks on what could be read.
        let errs =
            errors("[gateway]\nx = 1\n[retry]\ny = 2\n[[models]]\nz = 1\n[[models]]\nw = 1\n");
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields[..4],
            ["gateway.x", "retry.y", "models[0].z", "models[1].w"]
        );
        assert!(fields.contains(&"models[0].name"), "{fields:?}");
        assert!(fields.contains(&"models[1].endpoints"), "{fields:?}");
    }

    #[test]
    fn unknown_keys_do_not_hide_other_errors() {
        let text = r#"
[gateway]
foo = 1
max_concurrent = 0
[timeouts]
foo = 1
idle_ms = 0
[[models]]
name = "m"
endpoints = ["http://127.0.0.1:8001"]
foo = 1
[[models]]
name = "t"
endpoints = ["https://127.0.0.1:8002"]
[[models]]
name = "d"
endpoints = ["http://127.0.0.1:8003"]
[[models]]
name = "d"
endpoints = ["http://127.0.0.1:8004"]
"#;
        let errs = errors(text);
        let all = ConfigErrors(errs.clone()).to_string();
        assert!(has(&errs, "gateway.foo", "unknown field `foo`"), "{all}");
        assert!(has(&errs, "gateway.foo", "line 3"), "{all}");
        assert!(has(&errs, "gateway.foo", "`max_concurrent`"), "{all}");
        assert!(has(&errs, "timeouts.foo", "unknown field `foo`"), "{all}");
        assert!(has(&errs, "timeouts.foo", "`connect_ms`"), "{all}");
        assert!(has(&errs, "models[\"m\"].foo", "unknown field"), "{all}");
        assert!(has(&errs, "models[\"m\"].foo", "`endpoints`"), "{all}");
        assert!(
            has(&errs, "gateway.max_concurrent", "greater than 0"),
            "{all}"
        );
        assert!(has(&errs, "timeouts.idle_ms", "greater than 0"), "{all}");
        assert!(
            has(&errs, "models[\"t\"].endpoints[0]", "TLS upstreams"),
            "{all}"
        );
        assert!(has(&errs, "models[3].name", "already used"), "{all}");
        assert_eq!(errs.len(), 7, "{all}");
        // The shape `vllm-gateway check` is tested with.
        let errs = errors(
            "[gateway]\nmax_concurrent = 0\nfoo = 1\n\n\
             [[models]]\nname = \"a\"\nendpoints = [\"https://x:1\"]\n\n\
             [[models]]\nname = \"a\"\nendpoints = [\"http://127.0.0.1:1\"]\n",
        );
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "gateway.foo",
                "gateway.max_concurrent",
                "models[1].name",
                "models[0].endpoints[0]"
            ]
        );
    }

    #[test]
    fn unknown_keys_suggest_the_closest() {
        assert_error(
            "[gateway]\nworkerz = 2\n",
            "gateway.workerz",
            "did you mean `workers`?",
        );
        assert_error(
            "[timeouts]\nconnect = 1\n",
            "timeouts.connect",
            "did you mean `connect_ms`?",
        );
        assert_error(
            &with_model("endpoint = [\"http://127.0.0.1:1\"]"),
            "models[\"m\"].endpoint",
            "did you mean `endpoints`?",
        );
        assert_error("[gatway]\n", "gatway", "did you mean \"gateway\"?");
        let errs = errors("[gateway]\nzzz = 1\n");
        assert_eq!(errs.len(), 1);
        assert!(!errs[0].message.contains("did you mean"), "{}", errs[0]);
        assert!(
            errs[0].message.contains("`shutdown_grace_s`"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn known_keys_match_the_structs() {
        assert_eq!(struct_keys::<RawGateway>().len(), 13);
        assert_eq!(struct_keys::<RawTimeouts>().len(), 6);
        assert_eq!(struct_keys::<RawRetry>().len(), 3);
        assert_eq!(struct_keys::<RawGpus>(), ["vram_mib"]);
        assert_eq!(struct_keys::<RawDocker>(), ["host"]);
        assert_eq!(struct_keys::<RawModel>().len(), 19);
        assert_eq!(
            struct_keys::<RawConfig>(),
            ["gateway", "timeouts", "retry", "gpus", "docker", "models"]
        );
        // Every key the full example writes is known.
        parse_ok(FULL);
    }

    #[test]
    fn type_errors_do_not_hide_other_errors() {
        let text = r#"
[gateway]
max_concurrent = "x"
max_queue_size = 0
workers = "many"
[retry]
attempts = 0
[[models]]
name = "m"
endpoints = ["http://127.0.0.1:8001"]
max_queue_size = -1
health_path = "health"
"#;
        let errs = errors(text);
        let all = ConfigErrors(errs.clone()).to_string();
        assert!(has(&errs, "gateway.max_concurrent", "line 3"), "{all}");
        assert!(has(&errs, "gateway.workers", "line 5"), "{all}");
        assert!(
            has(&errs, "gateway.max_queue_size", "greater than 0"),
            "{all}"
        );
        assert!(has(&errs, "retry.attempts", "at least 1"), "{all}");
        assert!(has(&errs, "models[\"m\"].max_queue_size", "-1"), "{all}");
        assert!(has(&errs, "models[\"m\"].health_path", "\"/\""), "{all}");
        assert_eq!(errs.len(), 6, "{all}");
    }

    #[test]
    fn dropped_values_do_not_cause_follow_on_errors() {
        // A bad runtime would default to "static", which would then complain
        // about the process keys and the missing endpoints.
        let text = "[[models]]\nname = \"p\"\nruntime = 5\n\
                    command = [\"vllm\", \"{port}\"]\ngpus = [3]\nhealth_path = \"x\"\n";
        let errs = errors(text);
        let all = ConfigErrors(errs.clone()).to_string();
        assert!(has(&errs, "models[\"p\"].runtime", "line 3"), "{all}");
        assert!(has(&errs, "models[\"p\"].health_path", "\"/\""), "{all}");
        assert_eq!(errs.len(), 2, "{all}");
        // Placement is checked against [gpus] vram_mib, and VRAM against gpus.
        let text = format!(
            "[gpus]\nvram_mib = \"x\"\n{}",
            process_model("gpus = [1]\nvram_mib = 100")
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
        assert_eq!(errs[0].field, "gpus.vram_mib");
        let errs = errors(&process_model("gpus = \"0\"\nvram_mib = 999999"));
        assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
        assert_eq!(errs[0].field, "models[\"p\"].gpus");
        // A bad name falls back to the index, as validation does.
        let errs = errors("[[models]]\nname = 1\nendpoints = []\n");
        let all = ConfigErrors(errs.clone()).to_string();
        assert!(has(&errs, "models[0].name", "line 2"), "{all}");
        assert!(has(&errs, "models[0].endpoints", "at least one"), "{all}");
        assert_eq!(errs.len(), 2, "{all}");
    }

    #[test]
    fn errors_display_one_per_line() {
        let e = ConfigErrors(vec![
            FieldError::new("a", "x"),
            FieldError::new("b.c", "y z"),
        ]);
        assert_eq!(e.to_string(), "a: x\nb.c: y z");
    }

    #[test]
    fn redacted_json_hides_secrets() {
        let c = parse_ok(FULL);
        let j = c.redacted_json();
        assert_eq!(j["gateway"]["admin_token"], "***");
        assert_eq!(j["gateway"]["api_keys"], serde_json::json!(["***", "***"]));
        assert_eq!(j["models"][1]["env"]["HF_TOKEN"], "***");
        assert_eq!(j["models"][1]["env"]["CUDA_VISIBLE_DEVICES"], "***");
        assert_eq!(j["gateway"]["log_level"], "debug");
        let text = j.to_string();
        for secret in ["admin-secret", "key-one", "key-two", "hf_secret"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        // Defaults and inherited values are shown.
        assert_eq!(
            j["models"][0]["upstream_model"],
            "meta-llama/Llama-3.1-8B-Instruct"
        );
        assert_eq!(j["models"][1]["upstream_model"], "qwen");
        assert_eq!(j["models"][1]["max_concurrent"], 20);
        assert_eq!(j["models"][2]["env"], serde_json::json!({}));
        assert_eq!(j["models"][2]["startup_timeout_s"], 900);

        let j = parse_ok("").redacted_json();
        assert_eq!(j["gateway"]["admin_token"], "");
        assert_eq!(j["gateway"]["log_level"], "info");
        assert_eq!(j["timeouts"]["pool_idle_ms"], 4000);
        assert_eq!(j["retry"]["multiplier"], 1.5);
        assert_eq!(j["models"], serde_json::json!([]));
    }

    #[test]
    fn load_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gateway.toml");
        std::fs::write(&path, STATIC_M).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.models[0].name, "m");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.0[0].message.contains("cannot read"), "{err}");
    }
}

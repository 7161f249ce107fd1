//! Reload triggers and answers: the config file watcher (notify) and the diff report.

use std::path::Path;

use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// What a reload changed, as `POST /gateway/reload` answers it.
#[derive(Debug, Default)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub restarting: Vec<String>,
    pub restart_required: Vec<String>,
}

impl Diff {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "result": "ok",
            "added": self.added,
            "removed": self.removed,
            "changed": self.changed,
            "restarting": self.restarting,
            "restart_required": self.restart_required,
        })
    }
}

/// The OpenAI-shaped 400 for a refused reload, with every error.
pub fn error_body(message: &str, errors: &[String]) -> serde_json::Value {
    serde_json::json!({
        "error": {"message": message, "type": "invalid_request_error", "code": "invalid_config"},
        "errors": errors,
    })
}

/// Whether an event can mean the file's content changed. Reading the file ourselves raises
/// access events (open, close-after-read): those must not trigger a reload, or it would loop.
fn is_write(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        _ => false,
    }
}

/// Watch the config file's directory, not the file: editors and Kubernetes ConfigMaps replace
/// the file (a rename, or a swapped `..data` symlink), which a watch on the old inode misses.
/// Every write-like event in the directory sends a nudge; the control plane debounces them and
/// compares the file's content, so unrelated files there cost one read at most.
pub fn watch(path: &Path, nudge: mpsc::UnboundedSender<()>) -> notify::Result<RecommendedWatcher> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if is_write(&event.kind) {
                let _ = nudge.send(());
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, RenameMode};

    #[test]
    fn reads_do_not_count_as_writes() {
        assert!(!is_write(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_write(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_write(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_write(&EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        ))));
        assert!(is_write(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(is_write(&EventKind::Create(CreateKind::File)));
    }
}

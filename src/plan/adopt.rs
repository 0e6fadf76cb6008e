//! Finding a server whose start was interrupted (the hub's `start_timeout`
//! cancelled it, or the hub died) after the launch script ran but before its
//! pid reached the hub's state. The launch wrapper writes the pid into the
//! per-server directory, which the state names before launch, so the server
//! is found from there instead of being orphaned.

use super::script::quote;
use crate::error::Result;

/// What the adopt script prints when nothing of that run is alive.
pub const NOTHING: &str = "nothing";

/// Prints the same `key=value` lines as the launch script for the process in
/// `DIR/pid`, or [`NOTHING`].
pub fn adopt_script(dir: &str) -> Result<String> {
    let dir = quote(dir, "server directory")?;
    Ok(format!(
        r#"set -u
d={dir}
pid=$(cat "$d/pid" 2>/dev/null) || pid=
case $pid in ''|*[!0-9]*) echo {NOTHING}; exit 0 ;; esac
stat=$(cat "/proc/$pid/stat" 2>/dev/null) || {{ echo {NOTHING}; exit 0; }}
rest=${{stat##*) }}
set -- $rest
state=$1; pgid=$3
[ "$state" = Z ] && {{ echo {NOTHING}; exit 0; }}
shift 19; start=$1
uid=$(while read -r k v _; do [ "$k" = Uid: ] && echo "$v"; done < "/proc/$pid/status")
printf 'pid=%s\npgid=%s\nstart_time=%s\nuid=%s\nboot_id=%s\n' "$pid" "$pgid" "$start" "$uid" "$(cat /proc/sys/kernel/random/boot_id)"
"#
    ))
}

/// Removes a per-server directory in which nothing was started.
pub fn remove_dir_script(dir: &str) -> Result<String> {
    let dir = quote(dir, "server directory")?;
    Ok(format!("set -u\nrm -rf -- {dir}\n"))
}

# shellcheck shell=sh
# The adopt: finds a server whose start was interrupted (the hub's
# `start_timeout` cancelled it, or the hub died) after the launch ran but
# before its pid reached the hub's state, from the pid file the wrapper
# wrote into the server directory.
#
# Gets, from the preamble (src/plan/adopt.rs): `d` (the server directory),
# `env_marker` (`SSH_SPAWNER_RUN=RUN_ID`, as in every process of the run),
# `nothing` (what to print when there is none); and lib.sh's helpers.
#
# Prints the same `key=value` lines as the launch for the process in
# `$d/pid`, or `$nothing`; exits 0.
#
# A pid file can outlive its process (the server exited, the host rebooted)
# and its pid can then belong to another program of the same user, which
# stop would signal with its whole group. So the process is reported only
# when everything says it is this run's server:
# - the wrapper has not recorded an exit status;
# - the pid file was written during this boot (its mtime is after the boot
#   time), and the process started no later than that (a process started
#   after the pid file was written is a reused pid);
# - it is alive, not a zombie, and runs as this login;
# - its environment carries `$env_marker`, which the launch exports into
#   every process of the run.
#
# The preamble's values: read with `$`, as the shell has no other way.
# shellcheck disable=SC2154
set -u
no() { echo "$nothing"; exit 0; }
[ -e "$d/exit_status" ] && no
pid=$(cat "$d/pid" 2>/dev/null) || pid=''
case $pid in ''|*[!0-9]*) no ;; esac
[ "$pid" -gt 1 ] || no
written=$(stat -c %Y -- "$d/pid" 2>/dev/null) || no
btime=$(while read -r k v; do [ "$k" = btime ] && echo "$v"; done < /proc/stat)
tck=$(getconf CLK_TCK 2>/dev/null) || tck=100
case $written$btime$tck in *[!0-9]*|'') no ;; esac
[ "$written" -ge "$btime" ] || no
read_stat "$pid" || no
is_live || no
start=$s_start pgid=$s_pgrp
case $start in ''|*[!0-9]*) no ;; esac
[ $((btime + start / tck)) -le $((written + 1)) ] || no
read_uid "$pid" || no
read_login_uid
[ "$s_uid" = "$login_uid" ] || no
tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF "$env_marker" || no
read_boot_id
printf 'pid=%s\npgid=%s\nstart_time=%s\nuid=%s\nboot_id=%s\n' "$pid" "$pgid" "$start" "$s_uid" "$boot"

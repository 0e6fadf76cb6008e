# shellcheck shell=sh
# Prints the GPUs each of this login's servers holds, as its launch wrote
# them to `gpus` in its run directory (launch.sh): `gpu RUN_ID LINE` for
# each line of each `$HOME/$state/RUN_ID/gpus`, at most `max_runs` files
# and 2 KiB of each. Another login's run directories are 0700: only this
# login's own can be read, which is what `ssh-spawner list` says.
#
# Gets, from the preamble (src/plan/holders.rs): `state` (`state_dir`
# without `~/`), `max_runs`.
# Prints nothing when the login has no server holding GPUs; exits 0.
#
# The preamble's values: read with `$`, as the shell has no other way.
# shellcheck disable=SC2154
set -u
n=0
for f in "${HOME:-/nonexistent}/$state"/*/gpus; do
  [ -f "$f" ] || continue
  n=$((n + 1))
  [ "$n" -le "$max_runs" ] || break
  r=${f%/gpus}
  r=${r##*/}
  # The last line may lack its newline: it is read all the same.
  head -c 2048 -- "$f" | while IFS= read -r u || [ -n "$u" ]; do
    printf 'gpu %s %s\n' "$r" "$u"
  done
done
exit 0

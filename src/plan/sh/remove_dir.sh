# shellcheck shell=sh
# Removes a server directory in which nothing was started.
#
# Gets, from the preamble (src/plan/adopt.rs): `d`, the server directory
# (behind guard.sh, which checks it is under this login's home).
# Prints nothing; exits with `rm`'s status.
#
# The preamble's value: read with `$`, as the shell has no other way.
# shellcheck disable=SC2154
set -u
rm -rf -- "$d"

#!/usr/bin/env bash
# Runs every test, including real mpiexec jobs. Installs MPICH with apt-get when no MPICH mpiexec is found.
set -euo pipefail
cd "$(dirname "$0")"

have_mpich() {
  command -v mpiexec.mpich >/dev/null 2>&1 && return 0
  command -v mpiexec >/dev/null 2>&1 && mpiexec --version 2>&1 | grep -qi 'hydra\|mpich'
}
if ! have_mpich; then
  echo "test.sh: no MPICH mpiexec found; installing mpich with apt-get" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mpich >/dev/null
  have_mpich || { echo "test.sh: mpich installed but no MPICH mpiexec on PATH" >&2; exit 1; }
fi

export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT

dotnet build Distributed.sln -c Release -nologo -v q
status=0
dotnet test Distributed.sln -c Release --no-build --nologo \
  --logger "console;verbosity=normal" --logger trx --results-directory "$results" || status=$?

# One closing line over all test projects, from the trx files each project wrote.
passed=0; failed=0; skipped=0
for f in "$results"/*.trx; do
  [ -f "$f" ] || continue
  line=$(grep -o '<Counters [^>]*>' "$f" | head -n 1)
  get() { echo "$line" | sed -n "s/.* $1=\"\([0-9]*\)\".*/\1/p"; }
  p=$(get passed); fl=$(get failed); t=$(get total); e=$(get executed)
  passed=$((passed + ${p:-0})); failed=$((failed + ${fl:-0})); skipped=$((skipped + ${t:-0} - ${e:-0}))
done
echo "tests: ${passed} passed, ${failed} failed, ${skipped} skipped"
exit $status

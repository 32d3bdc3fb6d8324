# Sourced by the setup scripts: `quietly CMD ...` runs CMD with its output kept in a log, printed only if CMD fails
# (pip's and setuptools' chatter otherwise fills screens); the script then stops with CMD's exit code.
quietly() {
  local log status
  log=$(mktemp)
  if "$@" >"$log" 2>&1; then
    rm -f "$log"
  else
    status=$?
    cat "$log" >&2
    echo "FAILED (exit $status): $*" >&2
    rm -f "$log"
    exit "$status"
  fi
}

# `stdout_only CMD ...`: CMD's standard output as usual, its standard error only if it fails.
stdout_only() {
  local err status
  err=$(mktemp)
  if "$@" 2>"$err"; then
    rm -f "$err"
  else
    status=$?
    cat "$err" >&2
    rm -f "$err"
    exit "$status"
  fi
}

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

# `use_venv DIR`: create the virtual environment DIR with $PYTHON (default python3) unless it exists, activate it and
# bring its pip up to date.
use_venv() {
  if [ ! -x "$1/bin/python" ]; then
    quietly "${PYTHON:-python3}" -m venv "$1"
  fi
  . "$1/bin/activate"
  quietly python -m pip install --upgrade pip
}

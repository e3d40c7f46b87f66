#!/bin/sh
# What dvc.yaml runs: `sh scripts/stage.sh NAME` runs `rlhf stage NAME` (python -m flows.cli) with the
# Python that has this project installed, however DVC was started:
#   1. $RLHF_PYTHON, if set;
#   2. the Python that runs DVC (`.venv/bin/dvc` from a plain shell, `dvc` in an activated venv,
#      `python -m dvc` from the flow): the nearest ancestor process that is a Python;
#   3. the project's .venv (`make install`), then $VIRTUAL_ENV, then python3 on PATH.
# A candidate counts only if it can import the project's dependencies (mlflow), so a DVC installed
# on its own (pipx, a system package) falls through to the project's venv.
set -eu

usable() { [ -n "$1" ] && [ -x "$1" ] && "$1" -c "import importlib.util as u, sys; sys.exit(u.find_spec('mlflow') is None)" 2>/dev/null; }

# argv[0] of a process and its parent's pid: /proc on Linux, ps elsewhere
argv0() { if [ -r "/proc/$1/cmdline" ]; then tr '\0' '\n' < "/proc/$1/cmdline" | head -n 1; else ps -o args= -p "$1" | cut -d' ' -f1; fi; }
parent() { if [ -r "/proc/$1/status" ]; then awk '/^PPid:/ {print $2}' "/proc/$1/status"; else ps -o ppid= -p "$1" | tr -d ' '; fi; }

python_running_dvc() {
    pid=$PPID
    for _ in 1 2 3 4; do
        [ -n "$pid" ] && [ "$pid" -gt 1 ] || return 1
        exe=$(argv0 "$pid" 2>/dev/null || true)
        case "$(basename "${exe:-none}")" in
            python*) command -v "$exe" && return 0 ;;
        esac
        pid=$(parent "$pid" 2>/dev/null || true)
    done
    return 1
}

# huge pages for glibc's large allocations (flows/settings.py STAGE_ENV says why; the two must
# agree); a value the user set wins
export GLIBC_TUNABLES="${GLIBC_TUNABLES-glibc.malloc.hugetlb=1}"

root=${DVC_ROOT:-.}
for candidate in "${RLHF_PYTHON:-}" "$(python_running_dvc || true)" "$root/.venv/bin/python" \
                 "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "$(command -v python3 || true)"; do
    if usable "$candidate"; then
        exec "$candidate" -m flows.cli stage "$@"
    fi
done
echo "scripts/stage.sh: no Python with this project's dependencies found (set RLHF_PYTHON, or run make install)" >&2
exit 127

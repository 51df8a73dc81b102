#!/usr/bin/env bash
# Launches one glore_jax training job on a Cloud TPU pod slice: creates the slice through a
# queued resource, ships this repository to every worker, runs the trainer on all workers at
# once, re-runs it after preemption, fetches the logs and deletes the slice.
#
# Usage:
#   bash launch/tpu_pod.sh [OPTIONS] SUBCOMMAND [OPTIONS] [-- TRAIN_ARGS...]
#
# Subcommands:
#   create   request the slice as a queued resource and wait until it is ACTIVE
#   setup    copy HEAD of this repo (git archive) to every worker; venv + pip install there
#   run      run the trainer once on all workers (no retry)
#   resume   run, and after a preemption or failure re-create/re-setup and run again
#            (at most --max_restarts times); also the way to pick up after this launcher died
#   logs     fetch each worker's ~/glore_logs into --log_dir/NAME/worker-I
#   delete   delete the queued resource and its slice
#   all      create, setup, resume, logs, then delete (delete only if training finished)
#
# Options (--a_b and --a-b are the same option):
#   --name N              TPU node name (lowercase letters, digits, hyphens); required
#   --zone Z              zone, e.g. us-east5-a; required
#   --accelerator A       accelerator type, e.g. v5p-16; required by create, resume, all
#   --version V           TPU runtime version (default tpu-ubuntu2204-base)
#   --spot                request Spot capacity (cheaper, preemptible); default is on-demand
#   --reserved            take the capacity from the project's reservation
#   --project P           passed to every gcloud call as --project=P
#   --qr Q                queued-resource id (default NAME-qr)
#   --workers K           hosts in the slice, for the per-worker log fetch; when absent it is
#                         read from `tpu-vm describe` (a dry run assumes 1)
#   --repo_dir D          where the repo lives on each worker, relative to its home directory
#                         (default glore_jax)
#   --python P            interpreter for the workers' venv (default python3.11: the project needs
#                         Python >= 3.11 and Ubuntu 22.04 images ship 3.10)
#   --max_restarts R      resume: re-runs after the first attempt (default 10)
#   --poll_s S            seconds between state polls while waiting for ACTIVE (default 30)
#   --retry_sleep_s S     seconds to wait before a re-run (default 30)
#   --log_dir D           local folder for `logs` (default ./tpu_logs)
#   --keep                all: never delete the slice
#   --dry_run             print every command (one per line, prefixed "+ ") and run none
#   -h, --help            this text
#   TRAIN_ARGS            everything after `--` goes to `python -m glore_jax.train` unchanged
#                         (each word quoted with printf %q); run, resume and all need
#                         --config=... and --config.workdir=/an/absolute/shared/path
#
# Examples:
#   bash launch/tpu_pod.sh all --name glore-v5p --zone us-east5-a --accelerator v5p-16 --spot \
#     -- --config=configs/gsm8k_llama2_13b.py:sorm --config.workdir=/mnt/glore/13b/sorm
#   bash launch/tpu_pod.sh --dry_run all --name glore-v5p --zone us-east5-a --accelerator v5p-16 \
#     --workers 2 -- --config=configs/smoke.py --config.workdir=/mnt/glore/smoke
#
# Every host runs the same command; GLORE_DISTRIBUTED=1 makes each call
# jax.distributed.initialize(), which reads coordinator and process ids from
# the TPU metadata. The workdir must be one shared POSIX path on every host
# (a Filestore/NFS or gcsfuse mount), so all hosts write one checkpoint; the
# trainer's side files use plain file I/O, so gs:// URLs are not accepted.
# SIGTERM from a preemption is turned into a checkpoint and exit 0 with the log
# line "SIGTERM: saved a checkpoint"; re-running with the same workdir resumes
# exactly, which is all `resume` does.
#
# Exit codes: 0 done, 1 a command or the training failed, 2 bad usage (one `error:` line).
set -euo pipefail

readonly SUBCOMMANDS="create|setup|run|resume|logs|delete|all"
# Exit code the remote run command uses for "exit 0, but after SIGTERM": the trainer saved a
# checkpoint and stopped early, so the job is not finished (75 = EX_TEMPFAIL, "try again").
readonly EXIT_PREEMPTED=75
# Queued-resource states after which the slice is gone (or never came) and must be re-requested.
# PREEMPTED is not a documented queued-resource state; it is listed in case a release adds it.
readonly LOST_STATES=" SUSPENDING SUSPENDED FAILED DELETING PREEMPTED MISSING "
readonly SIGTERM_LINE="SIGTERM: saved a checkpoint"

# ---------------------------------------------------------------------------------------------
# Messages. Trace lines ("+ cmd") go to stdout in a dry run (that output is the plan) and to
# stderr otherwise, so that $(gcloud ...) captures only gcloud's own output.

usage_error() { echo "error: $* (see --help)" >&2; exit 2; }
fail() { echo "error: $*" >&2; exit 1; }
info() { if [[ ${DRY_RUN:-0} == 1 ]]; then echo "[tpu_pod dry run] $*" >&2; else echo "[tpu_pod] $*" >&2; fi; }

show_help() {
  # The header comment above is the help text: one place to keep up to date.
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

trace() {
  local line
  line=$(printf '%q ' "$@")
  # fd 3 is the script's own stdout (opened in main), so that a dry run's plan stays complete
  # even for commands traced inside $(...), such as the state query.
  if [[ $DRY_RUN == 1 ]]; then echo "+ ${line% }" >&3; else echo "+ ${line% }" >&2; fi
}

# Runs a command, or only prints it in a dry run. Every side effect of this script goes
# through here (or through gc, which calls it), so a dry run executes nothing.
run_cmd() {
  trace "$@"
  [[ $DRY_RUN == 1 ]] && return 0
  "$@"
}

# gcloud with the global flags that every call shares.
gc() {
  local extra=()
  [[ -n $PROJECT ]] && extra+=("--project=$PROJECT")
  # ${a[@]+"${a[@]}"}: an empty array under set -u, also in macOS's bash 3.2.
  run_cmd gcloud "$@" ${extra[@]+"${extra[@]}"}
}

# ---------------------------------------------------------------------------------------------
# Argument parsing.

DRY_RUN=0 SUBCOMMAND="" NAME="" ZONE="" ACCELERATOR="" VERSION="tpu-ubuntu2204-base"
SPOT=0 RESERVED=0 PROJECT="" QR="" WORKERS="" TARBALL="" REPO_DIR="glore_jax" PYTHON="python3.11"
MAX_RESTARTS=10 POLL_S=30 RETRY_SLEEP_S=30 LOG_DIR="./tpu_logs" KEEP=0
TRAIN_ARGS=()

parse_args() {
  local opt key value
  while (($#)); do
    opt=$1
    shift
    case $opt in
      --) TRAIN_ARGS=("$@"); return 0 ;;
      -h | --help) show_help; exit 0 ;;
      --*)
        # One spelling for every option: --dry-run == --dry_run; --name=N == --name N.
        key=${opt%%=*}
        key=${key//-/_}
        case $key in
          __dry_run | __spot | __reserved | __keep)
            [[ $opt == *=* ]] && usage_error "${opt%%=*} takes no value"
            case $key in
              __dry_run) DRY_RUN=1 ;; __spot) SPOT=1 ;; __reserved) RESERVED=1 ;; __keep) KEEP=1 ;;
            esac
            continue ;;
        esac
        case $key in
          __name | __zone | __accelerator | __version | __project | __qr | __workers | __repo_dir | \
            __python | __max_restarts | __poll_s | __retry_sleep_s | __log_dir) ;;
          *) usage_error "unknown option ${opt%%=*}" ;;
        esac
        if [[ $opt == *=* ]]; then
          value=${opt#*=}
        else
          (($#)) || usage_error "${opt} needs a value"
          value=$1
          shift
        fi
        case $key in
          __name) NAME=$value ;; __zone) ZONE=$value ;; __accelerator) ACCELERATOR=$value ;;
          __version) VERSION=$value ;; __project) PROJECT=$value ;; __qr) QR=$value ;;
          __workers) WORKERS=$value ;; __repo_dir) REPO_DIR=$value ;; __python) PYTHON=$value ;;
          __max_restarts) MAX_RESTARTS=$value ;; __poll_s) POLL_S=$value ;;
          __retry_sleep_s) RETRY_SLEEP_S=$value ;; __log_dir) LOG_DIR=$value ;;
        esac ;;
      -*) usage_error "unknown option $opt" ;;
      *)
        if [[ -n $SUBCOMMAND ]]; then
          # The launcher used to take NAME ZONE CONFIG [ARGS] positionally; say what replaced it.
          [[ "|$SUBCOMMANDS|" == *"|$SUBCOMMAND|"* ]] || usage_error "unknown subcommand '$SUBCOMMAND'" \
            "(expected $SUBCOMMANDS; the old 'NAME ZONE CONFIG ARGS' form is now" \
            "'run --name NAME --zone ZONE -- --config=CONFIG ARGS')"
          usage_error "unexpected argument '$opt' (training arguments go after --)"
        fi
        SUBCOMMAND=$opt ;;
    esac
  done
}

# Checks that need only the arguments, so that a typo fails in a second, before a slice is paid for.
validate_args() {
  [[ -n $SUBCOMMAND ]] || usage_error "missing subcommand ($SUBCOMMANDS)"
  [[ "|$SUBCOMMANDS|" == *"|$SUBCOMMAND|"* ]] ||
    usage_error "unknown subcommand '$SUBCOMMAND' (expected $SUBCOMMANDS)"
  [[ -n $NAME ]] || usage_error "missing --name"
  # GCP resource names; also keeps NAME safe inside the local log paths built from it.
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    usage_error "--name '$NAME' must be lowercase letters, digits and hyphens, starting with a letter"
  [[ -n $ZONE ]] || usage_error "missing --zone"
  QR=${QR:-$NAME-qr}
  [[ $QR =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] || usage_error "--qr '$QR' is not a valid resource id"
  case $SUBCOMMAND in
    create | resume | all) [[ -n $ACCELERATOR ]] || usage_error "missing --accelerator (e.g. v5p-16)" ;;
  esac
  ((SPOT && RESERVED)) && usage_error "--spot and --reserved exclude each other"
  local n
  for n in "max_restarts:$MAX_RESTARTS" "poll_s:$POLL_S" "retry_sleep_s:$RETRY_SLEEP_S" "workers:${WORKERS:-1}"; do
    [[ ${n#*:} =~ ^[0-9]+$ ]] || usage_error "--${n%%:*} must be a whole number"
  done
  [[ -z $WORKERS ]] || ((WORKERS >= 1)) || usage_error "--workers must be at least 1"
  # The remote setup clears REPO_DIR (all but its .venv) before unpacking, so it must name a
  # dedicated folder under the home directory: relative, no "." or ".." parts. A leading "~/"
  # is dropped (relative paths are relative to the worker's home anyway).
  REPO_DIR=${REPO_DIR#\~/}
  REPO_DIR=${REPO_DIR%/}
  [[ $REPO_DIR =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ ]] ||
    usage_error "--repo_dir '$REPO_DIR' must be a folder relative to the worker's home, e.g. glore_jax"
  [[ $PYTHON =~ ^[A-Za-z0-9_.-]+$ ]] || usage_error "--python '$PYTHON' must be a command name"
  if ((${#TRAIN_ARGS[@]} > 0)) && [[ $SUBCOMMAND != run && $SUBCOMMAND != resume && $SUBCOMMAND != all ]]; then
    usage_error "training arguments after -- only go with run, resume or all"
  fi
  case $SUBCOMMAND in run | resume | all) validate_train_args ;; esac
}

# The trainer fails on a missing workdir too, but only after the slice is up; and a local-disk
# workdir would "work" while each host writes its own partial checkpoint.
validate_train_args() {
  local i arg config="" workdir="" have_workdir=0
  for ((i = 0; i < ${#TRAIN_ARGS[@]}; i++)); do
    arg=${TRAIN_ARGS[i]}
    case $arg in
      --config=*) config=${arg#--config=} ;;
      --config) config=${TRAIN_ARGS[i + 1]:-} ;;
      --config.workdir=*) workdir=${arg#--config.workdir=}; have_workdir=1 ;;
      --config.workdir) workdir=${TRAIN_ARGS[i + 1]:-}; have_workdir=1 ;;
    esac
  done
  [[ -n $config ]] || usage_error "missing --config=FILE[:stage] after --"
  ((have_workdir)) || usage_error "missing --config.workdir=/shared/path after -- (one path shared by all hosts)"
  [[ $workdir != gs://* ]] || usage_error "--config.workdir must be a mounted POSIX path, not a gs:// URL"
  [[ $workdir == /* ]] || usage_error "--config.workdir must be an absolute path on a mount shared by all hosts"
}

# ---------------------------------------------------------------------------------------------
# The queued resource.

create_qr() {
  local flags=(--node-id="$NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR"
    --runtime-version="$VERSION")
  ((SPOT)) && flags+=(--spot)
  ((RESERVED)) && flags+=(--reserved)
  gc compute tpus queued-resources create "$QR" "${flags[@]}"
}

# Prints the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...), or
# MISSING when describe fails (not found, most often). A dry run prints the describe command
# once and reports ACTIVE, so no loop runs.
qr_state() {
  local state
  if [[ $DRY_RUN == 1 ]]; then
    gc compute tpus queued-resources describe "$QR" --zone="$ZONE" --format='value(state.state)'
    echo ACTIVE
    return 0
  fi
  state=$(gc compute tpus queued-resources describe "$QR" --zone="$ZONE" --format='value(state.state)') || state=""
  echo "${state:-MISSING}"
}

is_lost() { [[ $LOST_STATES == *" $1 "* ]]; }

# Polls until ACTIVE; returns 1 if the request ended without capacity (FAILED, SUSPENDED, gone).
# No timeout: a queued request may legitimately wait hours for capacity; interrupt to give up.
wait_active() {
  local state last=""
  while true; do
    state=$(qr_state)
    [[ $state == ACTIVE ]] && { info "queued resource $QR is ACTIVE"; return 0; }
    if is_lost "$state"; then
      info "queued resource $QR is $state, not becoming ACTIVE"
      return 1
    fi
    [[ $state != "$last" ]] && info "queued resource $QR is $state; polling every ${POLL_S}s"
    last=$state
    sleep "$POLL_S"
  done
}

delete_qr() {
  # --force deletes the slice with the request; --quiet answers gcloud's confirmation prompt.
  gc compute tpus queued-resources delete "$QR" --zone="$ZONE" --force --quiet
}

# ---------------------------------------------------------------------------------------------
# Setup on the workers.

repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

# Ships `git archive HEAD` rather than having workers `git clone`: workers need no access to
# (or credentials for) a git remote, nothing has to be pushed first, and every worker gets the
# same bytes as the launching checkout. Uncommitted edits are not shipped (a warning says so).
# (Explicit `|| return 1`: this also runs inside `ensure_pod || ...`, where set -e is off.)
setup_workers() {
  local root remote
  root=$(repo_root)
  TARBALL="${TMPDIR:-/tmp}/glore_jax-$NAME-$$.tar.gz"
  if [[ $DRY_RUN == 0 ]] && [[ -n $(git --no-optional-locks -C "$root" status --porcelain --untracked-files=no) ]]; then
    info "warning: uncommitted changes in $root are not shipped (git archive HEAD)"
  fi
  [[ $DRY_RUN == 1 ]] || trap 'rm -f "$TARBALL"' EXIT
  run_cmd git -C "$root" archive --format=tar.gz --output="$TARBALL" HEAD || return 1
  # A relative remote path is relative to the worker's home directory for scp and ssh alike.
  gc compute tpus tpu-vm scp "$TARBALL" "$NAME:glore_jax.tar.gz" --worker=all --zone="$ZONE" || return 1
  remote=$(install_command)
  gc compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$remote" || return 1
  [[ $DRY_RUN == 1 ]] || { rm -f "$TARBALL"; trap - EXIT; }
}

# One line of shell for every worker: unpack over the old tree (keeping its .venv, so a re-setup
# after a code change takes seconds), make the venv with python3 -m venv, install the package
# with its `tpu` extra (jax[tpu]: the libtpu matched to the installed jax).
install_command() {
  local r py
  r=$(printf '%q' "$REPO_DIR")
  py=$(printf '%q' "$PYTHON")
  printf '%s' "set -e; mkdir -p $r; find $r -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +; " \
    "tar -xzf glore_jax.tar.gz -C $r; rm -f glore_jax.tar.gz; cd $r; " \
    "command -v $py >/dev/null || { sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $py $py-venv; }; " \
    "[ -x .venv/bin/python ] || $py -m venv .venv; " \
    ".venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e '.[tpu]'"
}

# ---------------------------------------------------------------------------------------------
# Training.

# One line of shell run on every worker. It
#  - kills this worker's trainer left over from an earlier attempt (by the pid it recorded, and
#    only if that pid still runs glore_jax.train): a stale process holds the TPU and would make
#    the new run fail;
#  - runs the trainer with GLORE_DISTRIBUTED=1 from the repo dir, the venv's python, and the
#    training args each quoted with printf %q, so spaces and quotes arrive intact;
#  - tees the output to ~/glore_logs/train-TIME.log (fetched by `logs`);
#  - turns "exit 0 after SIGTERM" into exit 75, because the trainer exits 0 both when it
#    finished and when it saved on SIGTERM, and only the log line tells them apart.
# It needs bash on the worker (BASHPID, PIPESTATUS): the login shell of TPU VM images.
run_command() {
  local r args
  r=$(printf '%q' "$REPO_DIR")
  args=$(printf ' %q' ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  printf '%s' "cd $r || exit 1; mkdir -p ~/glore_logs; pidf=~/glore_logs/train.pid; " \
    "log=~/glore_logs/train-\$(date +%Y%m%dT%H%M%S).log; " \
    "if [ -f \"\$pidf\" ] && p=\$(cat \"\$pidf\") && grep -qa glore_jax.train /proc/\$p/cmdline 2>/dev/null; " \
    "then echo \"killing stale trainer \$p\"; kill -KILL \$p; sleep 5; fi; " \
    "( echo \$BASHPID > \"\$pidf\"; GLORE_DISTRIBUTED=1 exec .venv/bin/python -m glore_jax.train$args ) 2>&1 | tee \"\$log\"; " \
    "rc=\${PIPESTATUS[0]}; " \
    "if [ \$rc -eq 0 ] && grep -q '$SIGTERM_LINE' \"\$log\"; then rc=$EXIT_PREEMPTED; fi; exit \$rc"
}

# Runs the trainer once on all workers; returns the remote exit code (gcloud --worker=all waits
# for every worker and exits with a non-zero worker status if there is one).
run_once() {
  local remote
  remote=$(run_command)
  gc compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command="$remote"
}

# Makes the slice usable: ACTIVE as is; still queued -> wait; gone -> delete the request,
# request it again, wait, and set the new workers up (a new slice has empty disks).
ensure_pod() {
  local state=$1
  [[ $state == ACTIVE ]] && return 0
  if ! is_lost "$state"; then
    wait_active && return 0
    state=$(qr_state)
  fi
  info "re-creating the slice (queued resource was $state)"
  [[ $state == MISSING ]] || delete_qr || return 1
  create_qr || return 1
  wait_active || return 1
  setup_workers
}

# The preemption loop. Each pass makes sure the slice is up, runs the trainer, and stops when it
# exited 0 with the slice still ACTIVE (finished). A preemption shows as exit 75 (SIGTERM saved
# a checkpoint), as a failed ssh (the VM vanished), or as exit 0 while the queued resource
# reports SUSPENDED/FAILED; all of them lead to another pass, which resumes from the newest
# checkpoint in the shared workdir. Exit 2 is the trainer's "bad config/input": not retried.
# $1 = 1: check the slice before the first run (a standalone `resume`); 0: it was just made.
resume_loop() {
  local check=$1 restarts=0 rc state
  while true; do
    rc=0
    if ((check)); then
      state=$(qr_state)
      ensure_pod "$state" || rc=1
    fi
    check=1
    if ((rc == 0)); then
      run_once || rc=$?
      case $rc in
        0)
          state=$(qr_state)
          if ! is_lost "$state"; then info "training finished"; return 0; fi
          info "the run exited 0 but the queued resource is $state: treating it as preempted" ;;
        2) info "the trainer exited 2 (bad config or input; see its error line): not retrying"; return 1 ;;
        "$EXIT_PREEMPTED") info "the trainer got SIGTERM and saved a checkpoint" ;;
        *) info "the run exited $rc" ;;
      esac
    fi
    if [[ $DRY_RUN == 1 ]]; then
      info "dry run: on preemption or failure the steps above repeat, at most $MAX_RESTARTS times"
      return 0
    fi
    if ((restarts >= MAX_RESTARTS)); then
      info "giving up after $restarts restarts (--max_restarts $MAX_RESTARTS)"
      return 1
    fi
    restarts=$((restarts + 1))
    info "restart $restarts of $MAX_RESTARTS in ${RETRY_SLEEP_S}s; the trainer resumes from its newest checkpoint"
    sleep "$RETRY_SLEEP_S"
  done
}

# ---------------------------------------------------------------------------------------------
# Logs.

worker_count() {
  if [[ -n $WORKERS ]]; then echo "$WORKERS"; return 0; fi
  if [[ $DRY_RUN == 1 ]]; then echo 1; return 0; fi
  local n
  n=$(gc compute tpus tpu-vm describe "$NAME" --zone="$ZONE" --format='value(networkEndpoints.len())')
  [[ $n =~ ^[1-9][0-9]*$ ]] || { info "could not read the worker count; pass --workers"; return 1; }
  echo "$n"
}

# Fetches each worker's ~/glore_logs separately (gcloud's --worker=all scp would write every
# worker's files onto one local path). Best effort: a preempted worker's disk is gone.
fetch_logs() {
  local n i dest stamp ok=0
  n=$(worker_count) || return 1
  stamp=$(date +%Y%m%dT%H%M%S)
  run_cmd mkdir -p "$LOG_DIR/$NAME"
  for ((i = 0; i < n; i++)); do
    dest="$LOG_DIR/$NAME/worker-$i-$stamp"
    if gc compute tpus tpu-vm scp --recurse "$NAME:glore_logs" "$dest" --worker="$i" --zone="$ZONE"; then
      ok=$((ok + 1))
    else
      info "could not fetch worker $i's logs"
    fi
  done
  ((ok == n))
}

# ---------------------------------------------------------------------------------------------

main() {
  exec 3>&1
  parse_args "$@"
  validate_args
  case $SUBCOMMAND in
    create) create_qr; wait_active || fail "queued resource $QR did not become ACTIVE" ;;
    setup) setup_workers ;;
    run)
      local rc=0
      run_once || rc=$?
      ((rc == 0)) && return 0
      ((rc == EXIT_PREEMPTED)) && fail "preempted: a checkpoint was saved; \`resume\` continues"
      fail "the run exited $rc" ;;
    resume) resume_loop 1 || { fetch_logs || true; fail "training did not finish"; } ;;
    logs) fetch_logs || fail "some logs could not be fetched" ;;
    delete) delete_qr ;;
    all)
      create_qr
      wait_active || fail "queued resource $QR did not become ACTIVE"
      setup_workers
      if resume_loop 0; then
        fetch_logs || true
        if ((KEEP)); then info "--keep: the slice stays up"; else delete_qr; fi
      else
        fetch_logs || true
        fail "training did not finish; the slice is kept for inspection (\`delete\` removes it)"
      fi ;;
  esac
}

main "$@"

#!/usr/bin/env bash
# A real single-machine HTCondor pool for ckpt_tasks' tests.
#
# Debian 12 has no HTCondor daemons, so the pool runs Debian 13's `minicondor`
# inside a debootstrapped trixie chroot (see the project's HTCondor notes).
#
#   scripts/htcondor_pool.sh build        # debootstrap + minicondor (cached, minutes)
#   scripts/htcondor_pool.sh start        # mounts, condor_master, wait until usable
#   scripts/htcondor_pool.sh status       # exit 0 when the pool is up, 1 otherwise
#   scripts/htcondor_pool.sh stop         # condor_off, wait, unmount everything
#   scripts/htcondor_pool.sh exec CMD...       # run CMD in the chroot as the job user
#   scripts/htcondor_pool.sh root-exec CMD...  # run CMD in the chroot as root
#
# exec/root-exec: one argument is a bash script (`exec "condor_q -af JobStatus"`);
# several arguments are one command with those exact arguments. The command runs
# in a login shell with a clean environment (HOME, USER, PATH from the chroot's
# profile, LANG=C.UTF-8) plus the host variables named in CKPT_TASKS_POOL_PASSENV
# (space- or colon-separated names). It starts in the caller's working directory
# when the chroot sees that very directory at the same path (under a bind-mounted
# folder), otherwise in the user's home. Its exit status is the command's.
#
# Environment:
#   CKPT_TASKS_POOL_DIR      chroot directory (default /var/cache/ckpt_tasks/htcondor-pool)
#   CKPT_TASKS_POOL_BINDS    colon-separated absolute host paths bind-mounted at the same
#                            paths inside the chroot (default: this repository and the
#                            Python installation that .venv/bin/python comes from)
#   CKPT_TASKS_POOL_MIRROR   Debian mirror for debootstrap (default: the URI of the
#                            host's own Debian archive, read from the apt configuration)
#   CKPT_TASKS_POOL_PASSENV  host variables passed to exec/root-exec commands
#   CKPT_TASKS_POOL_TIMEOUT  seconds `start` waits for the pool (default 120)
#
# Every subcommand is safe to repeat. Must run as root.
set -euo pipefail

readonly SUITE="trixie"
readonly JOB_USER="ckptuser"
# Bump when the build recipe changes: a pool built by an older recipe is rebuilt.
readonly RECIPE_VERSION="1"
readonly CONFIG_NAME="99-ckpt-tasks.conf"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
POOL_DIR="${CKPT_TASKS_POOL_DIR:-/var/cache/ckpt_tasks/htcondor-pool}"
POOL_DIR="$(realpath -m -- "${POOL_DIR}")"
STAMP="${POOL_DIR}/.ckpt_tasks-pool-built"
LOCK_FILE="${POOL_DIR}.lock"
START_TIMEOUT="${CKPT_TASKS_POOL_TIMEOUT:-120}"
CHROOT="$(command -v chroot || echo /usr/sbin/chroot)"
CHROOT_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

say() { echo "htcondor_pool: $*"; }
warn() { echo "htcondor_pool: warning: $*" >&2; }
die() { echo "htcondor_pool: error: $*" >&2; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (chroot, mount and useradd need it)"
}

is_built() {
    [ -f "${STAMP}" ] && [ "$(sed -n 's/^recipe=//p' "${STAMP}" 2>/dev/null)" = "${RECIPE_VERSION}" ]
}

require_built() {
    is_built || die "no finished pool in ${POOL_DIR}; run: $0 build"
}

# Serialise build/start/stop (two test sessions may call start at once).
take_lock() {
    mkdir -p -- "$(dirname -- "${POOL_DIR}")"
    exec 9>>"${LOCK_FILE}"
    if ! flock -w 900 9; then
        die "another htcondor_pool.sh holds ${LOCK_FILE} for too long"
    fi
}

# --- processes and mounts ---------------------------------------------------

# PIDs of every process whose root directory is the chroot.
chroot_pids() {
    local proc pid root
    for proc in /proc/[0-9]*; do
        pid="${proc#/proc/}"
        root="$(readlink -- "${proc}/root" 2>/dev/null)" || continue
        [ "${root}" = "${POOL_DIR}" ] && echo "${pid}"
    done
    return 0
}

master_pids() {
    local pid
    for pid in $(chroot_pids); do
        [ "$(cat "/proc/${pid}/comm" 2>/dev/null)" = "condor_master" ] && echo "${pid}"
    done
    return 0
}

master_running() { [ -n "$(master_pids)" ]; }

# condor_master processes of any other pool on this host ("pid (root DIR)").
other_masters() {
    local proc root
    for proc in /proc/[0-9]*; do
        [ "$(cat "${proc}/comm" 2>/dev/null)" = "condor_master" ] || continue
        root="$(readlink -- "${proc}/root" 2>/dev/null)" || continue
        [ "${root}" = "${POOL_DIR}" ] || echo "${proc#/proc/} (root ${root})"
    done | paste -sd ' '
}

# Mount points at or under the pool directory, deepest (last mounted) first.
pool_mounts() {
    local target
    awk '{print $5}' /proc/self/mountinfo | tac | while IFS= read -r target; do
        target="$(printf '%b' "${target}")"   # mountinfo escapes spaces as \040
        case "${target}" in
            "${POOL_DIR}" | "${POOL_DIR}"/*) echo "${target}" ;;
        esac
    done | awk '!seen[$0]++'
}

is_mounted() { pool_mounts | grep -qxF -- "$1"; }

mount_once() {  # mount_once TARGET MOUNT-ARGS...
    local target="$1"
    shift
    if is_mounted "${target}"; then
        return 0
    fi
    mount "$@" "${target}" || die "mount $* ${target} failed"
    say "mounted ${target}"
}

unmount_all() {
    local target rest pass
    # Several passes: a path mounted twice (stacked) shows up once per pass.
    for pass in 1 2 3 4 5; do
        rest="$(pool_mounts)"
        [ -n "${rest}" ] || return 0
        while IFS= read -r target; do
            [ -n "${target}" ] || continue
            if umount -- "${target}" 2>/dev/null; then
                say "unmounted ${target}"
            elif umount -l -- "${target}" 2>/dev/null; then
                say "unmounted ${target} (lazily: it was busy)"
            else
                [ "${pass}" -lt 5 ] || warn "could not unmount ${target}"
            fi
        done <<<"${rest}"
    done
    rest="$(pool_mounts)"
    [ -z "${rest}" ] || die "still mounted under ${POOL_DIR}: ${rest//$'\n'/ }"
}

# Ends every process left in the chroot (ours: daemons, jobs, exec'd commands).
kill_chroot_processes() {
    local pids signal
    for signal in TERM KILL; do
        pids="$(chroot_pids | tr '\n' ' ')"
        [ -n "${pids// /}" ] || return 0
        say "sending SIG${signal} to processes left in the chroot: ${pids}"
        # shellcheck disable=SC2086
        kill "-${signal}" ${pids} 2>/dev/null || true
        for _ in $(seq 1 20); do
            [ -z "$(chroot_pids)" ] && return 0
            sleep 0.5
        done
    done
    [ -z "$(chroot_pids)" ] || warn "processes still in the chroot: $(chroot_pids | tr '\n' ' ')"
}

# --- running things inside the chroot ---------------------------------------

# The command line for `bash -lc`: one argument is a script, several are argv.
command_string() {
    if [ "$#" -eq 1 ]; then
        printf '%s' "$1"
    else
        local arg out=""
        for arg in "$@"; do
            out+="$(printf '%q' "${arg}") "
        done
        printf '%s' "${out% }"
    fi
}

# A clean environment for commands in the chroot, plus CKPT_TASKS_POOL_PASSENV;
# sets the array ENV_ARGS.
chroot_env() {  # chroot_env HOME USER
    local name passenv="${CKPT_TASKS_POOL_PASSENV:-}"
    ENV_ARGS=("HOME=$1" "USER=$2" "LOGNAME=$2" "PATH=${CHROOT_PATH}" "LANG=C.UTF-8" "SHELL=/bin/bash")
    for name in ${passenv//:/ }; do
        [[ "${name}" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "bad name in CKPT_TASKS_POOL_PASSENV: ${name}"
        if [ -n "${!name+set}" ]; then
            ENV_ARGS+=("${name}=${!name}")
        fi
    done
}

# Run in the chroot as root (no login shell), for the script's own work.
in_chroot() {
    env -i PATH="${CHROOT_PATH}" HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
        "${CHROOT}" "${POOL_DIR}" "$@"
}

run_in_chroot() {  # run_in_chroot USER CMD...
    local user="$1"
    shift
    local cmd home prefix=""
    cmd="$(command_string "$@")"
    if [ "${user}" = root ]; then home=/root; else home="/home/${user}"; fi
    # Same directory on both sides (a bind mount), not merely the same path.
    if [ "${PWD}" != / ] && [ "${POOL_DIR}${PWD}" -ef "${PWD}" ]; then
        prefix="cd $(printf '%q' "${PWD}") 2>/dev/null || cd; "
    else
        prefix="cd; "
    fi
    chroot_env "${home}" "${user}"
    if [ "${user}" = root ]; then
        exec env -i "${ENV_ARGS[@]}" "${CHROOT}" "${POOL_DIR}" /bin/bash -lc "${prefix}${cmd}"
    else
        exec env -i "${ENV_ARGS[@]}" "${CHROOT}" "${POOL_DIR}" \
            runuser -u "${user}" -- /bin/bash -lc "${prefix}${cmd}"
    fi
}

# --- configuration (run by build and again by start: cheap, keeps it current) --

host_codename() {
    # shellcheck disable=SC1091
    (. /etc/os-release && echo "${VERSION_CODENAME:-}")
}

# The host's Debian archive URI, read from its apt configuration.
debian_mirror() {
    if [ -n "${CKPT_TASKS_POOL_MIRROR:-}" ]; then
        echo "${CKPT_TASKS_POOL_MIRROR}"
        return 0
    fi
    local codename files=() f uri
    codename="$(host_codename)"
    [ -n "${codename}" ] || die "cannot read the host's Debian codename from /etc/os-release"
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "${f}" ] && files+=("${f}")
    done
    [ "${#files[@]}" -gt 0 ] || die "no apt sources found; set CKPT_TASKS_POOL_MIRROR"
    uri="$(awk -v suite="${codename}" '
        function flush() {
            if (found) return
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled && uri != "") {
                n = split(suites, s, /[ \t]+/)
                for (i = 1; i <= n; i++) if (s[i] == suite) { print uri; found = 1; exit }
            }
            types = ""; suites = ""; uri = ""; enabled = 1
        }
        BEGIN { enabled = 1 }
        FILENAME != last { flush(); last = FILENAME }
        FILENAME ~ /\.sources$/ {
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^#/) next
            key = tolower($1)
            val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types:") types = val
            else if (key == "uris:") { split(val, u, /[ \t]+/); uri = u[1] }
            else if (key == "suites:") suites = val
            else if (key == "enabled:") enabled = (tolower(val) != "no")
            next
        }
        /^[ \t]*deb[ \t]/ {
            line = $0; sub(/^[ \t]*deb[ \t]+/, "", line)
            if (line ~ /^\[/) sub(/^\[[^]]*\][ \t]*/, "", line)
            split(line, w, /[ \t]+/)
            if (w[2] == suite) { print w[1]; found = 1; exit }
        }
        END { flush() }
    ' "${files[@]}")"
    [ -n "${uri}" ] || die "no Debian archive for '${codename}' in the apt sources; set CKPT_TASKS_POOL_MIRROR"
    echo "${uri}"
}

ensure_group_and_user_on_host() {  # prints "uid gid"
    local chroot_uid="" chroot_gid=""
    if ! getent passwd "${JOB_USER}" >/dev/null; then
        # Reuse the chroot's ids (a cached pool on a fresh host) when they are free.
        if [ -f "${POOL_DIR}/etc/passwd" ]; then
            chroot_uid="$(awk -F: -v u="${JOB_USER}" '$1 == u {print $3}' "${POOL_DIR}/etc/passwd")"
            chroot_gid="$(awk -F: -v u="${JOB_USER}" '$1 == u {print $4}' "${POOL_DIR}/etc/passwd")"
        fi
        local -a args=(-m -s /bin/bash)
        if [ -n "${chroot_uid}" ] && ! getent passwd "${chroot_uid}" >/dev/null; then
            args+=(-u "${chroot_uid}")
            if ! getent group "${JOB_USER}" >/dev/null && [ -n "${chroot_gid}" ] \
                    && ! getent group "${chroot_gid}" >/dev/null; then
                groupadd -g "${chroot_gid}" "${JOB_USER}"
            fi
        fi
        getent group "${JOB_USER}" >/dev/null && args+=(-g "${JOB_USER}")
        useradd "${args[@]}" "${JOB_USER}" >&2 || die "cannot create the host user ${JOB_USER}"
        echo "htcondor_pool: created host user ${JOB_USER}" >&2
    fi
    echo "$(id -u "${JOB_USER}") $(id -g "${JOB_USER}")"
}

# The chroot's job user gets the host user's UID and GID.
ensure_job_user() {
    local ids uid gid cur_uid cur_gid owner
    ids="$(ensure_group_and_user_on_host)"
    uid="${ids% *}"
    gid="${ids#* }"
    owner="$(in_chroot getent passwd "${uid}" | cut -d: -f1 || true)"
    [ -z "${owner}" ] || [ "${owner}" = "${JOB_USER}" ] \
        || die "UID ${uid} of the host user ${JOB_USER} belongs to '${owner}' in the chroot"
    owner="$(in_chroot getent group "${gid}" | cut -d: -f1 || true)"
    if ! in_chroot getent group "${JOB_USER}" >/dev/null; then
        [ -z "${owner}" ] || die "GID ${gid} of the host user ${JOB_USER} belongs to group '${owner}' in the chroot"
        in_chroot groupadd -g "${gid}" "${JOB_USER}"
    elif [ "$(in_chroot getent group "${JOB_USER}" | cut -d: -f3)" != "${gid}" ]; then
        [ -z "${owner}" ] || die "GID ${gid} of the host user ${JOB_USER} belongs to group '${owner}' in the chroot"
        in_chroot groupmod -g "${gid}" "${JOB_USER}"
    fi
    if ! in_chroot getent passwd "${JOB_USER}" >/dev/null; then
        in_chroot useradd -m -u "${uid}" -g "${gid}" -s /bin/bash "${JOB_USER}"
        say "created chroot user ${JOB_USER} (uid ${uid}, gid ${gid})"
    else
        cur_uid="$(in_chroot id -u "${JOB_USER}")"
        cur_gid="$(in_chroot id -g "${JOB_USER}")"
        if [ "${cur_uid}" != "${uid}" ] || [ "${cur_gid}" != "${gid}" ]; then
            in_chroot usermod -u "${uid}" -g "${gid}" "${JOB_USER}"
            in_chroot chown -R "${uid}:${gid}" "/home/${JOB_USER}"
            say "chroot user ${JOB_USER} now has uid ${uid}, gid ${gid} (as on the host)"
        fi
    fi
}

write_condor_config() {
    local cpus mem_mb file="${POOL_DIR}/etc/condor/config.d/${CONFIG_NAME}" tmp
    cpus="$(nproc)"
    [ "${cpus}" -ge 4 ] || cpus=4
    mem_mb="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    [ "${mem_mb}" -ge 8192 ] || mem_mb=8192
    tmp="$(mktemp "${file}.XXXXXX")"
    cat >"${tmp}" <<CONF
# Written by ckpt_tasks' scripts/htcondor_pool.sh (rewritten on every build/start).
# A chroot cannot unshare mount or PID namespaces, nor use its own cgroups.
MOUNT_UNDER_SCRATCH =
MOUNT_PRIVATE_DEV_SHM = False
USE_PID_NAMESPACES = False
BASE_CGROUP =

# Short intervals: tests wait on the pool.
SCHEDD_INTERVAL = 2
NEGOTIATOR_INTERVAL = 2
NEGOTIATOR_CYCLE_DELAY = 2
STARTER_UPDATE_INTERVAL = 2
SHADOW_QUEUE_UPDATE_INTERVAL = 2
UPDATE_INTERVAL = 5
MASTER_UPDATE_INTERVAL = 5

# One partitionable slot with room for several small concurrent jobs, whatever
# the host's size (at least ${cpus} CPUs, ${mem_mb} MB).
NUM_CPUS = ${cpus}
MEMORY = ${mem_mb}
NUM_SLOTS = 1
NUM_SLOTS_TYPE_1 = 1
SLOT_TYPE_1 = 100%
SLOT_TYPE_1_PARTITIONABLE = True

# Run jobs whenever a slot is free; never suspend or preempt on load.
START = True
SUSPEND = False
PREEMPT = False
KILL = False

# x509userproxy: copy the proxy file to the job instead of delegating it. Delegation
# cannot work with this HTCondor (23.9) on trixie's OpenSSL 3.5: the starter's
# certificate request sets X509_REQ version 2, which OpenSSL 3.5 refuses (3.0 took it), so it logs
# "get_x509_delegation(): delegation failed: X509Credential::Request() failed" and the
# job's X509_USER_PROXY names a file that never arrives. Copying is what a site with such
# an HTCondor must configure too; transfers between shadow and starter stay authenticated.
DELEGATE_JOB_GSI_CREDENTIALS = False
# How often a running job's shadow looks for a renewed x509userproxy on the access point
# (default 600 s): short, so a test sees a renewal reach a running job.
SHADOW_CHECKPROXY_INTERVAL = 5
CONF
    chmod 644 "${tmp}"
    mv -f "${tmp}" "${file}"
}

configure_chroot() {
    [ -d "${POOL_DIR}/etc/condor/config.d" ] || die "${POOL_DIR} has no /etc/condor/config.d (minicondor missing?)"
    write_condor_config
    # HTCondor's curl plugin crashed in freeaddrinfo() without the hostname here.
    local host line
    host="$(hostname)"
    line="127.0.0.1 localhost ${host}"
    if ! grep -qxF "${line}" "${POOL_DIR}/etc/hosts" 2>/dev/null; then
        {
            echo "${line}"
            grep -v -E '^127\.0\.0\.1[[:space:]]' "${POOL_DIR}/etc/hosts" 2>/dev/null || true
        } >"${POOL_DIR}/etc/hosts.new"
        mv -f "${POOL_DIR}/etc/hosts.new" "${POOL_DIR}/etc/hosts"
    fi
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        mkdir -p "${POOL_DIR}/etc/ssl/certs"
        cp -f /etc/ssl/certs/ca-certificates.crt "${POOL_DIR}/etc/ssl/certs/ca-certificates.crt"
    fi
    [ -f /etc/resolv.conf ] && cp -fL /etc/resolv.conf "${POOL_DIR}/etc/resolv.conf" 2>/dev/null || true
    ensure_job_user
    # The job user must reach binds under /root (e.g. /root/.pyenv).
    chmod o+rx "${POOL_DIR}/root"
}

# --- build ------------------------------------------------------------------

cmd_build() {
    require_root
    take_lock
    if is_built; then
        say "pool already built in ${POOL_DIR} ($(sed -n 's/^finished=//p' "${STAMP}")); refreshing its configuration"
        configure_chroot
        say "build: nothing to do"
        return 0
    fi
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install -y debootstrap"
    local started mirror
    started="$(date +%s)"
    if [ -e "${POOL_DIR}" ]; then
        say "found an unfinished or outdated pool in ${POOL_DIR}; removing it"
        if master_running; then
            in_chroot condor_off -master >/dev/null 2>&1 || true
            sleep 2
        fi
        kill_chroot_processes
        unmount_all
        # Never delete through a mount point (bind mounts of host folders).
        [ -z "$(pool_mounts)" ] || die "refusing to delete ${POOL_DIR}: mounts remain"
        rm -rf --one-file-system -- "${POOL_DIR}"
    fi
    mirror="$(debian_mirror)"
    mkdir -p -- "${POOL_DIR}"
    say "[1/4] debootstrap --variant=minbase ${SUITE} ${POOL_DIR} ${mirror}"
    local log="${POOL_DIR}.debootstrap.log"
    # Per-package lines go to the log only; the phases are shown.
    if ! debootstrap --variant=minbase "${SUITE}" "${POOL_DIR}" "${mirror}" 2>&1 | tee "${log}" \
            | awk '$2 ~ /^(Retrieving|Validating|Extracting|Unpacking|Configuring)$/ && NF <= 4 && !/packages\.\.\.$/ { next }
                   /^[IEW]: / { print "htcondor_pool:     debootstrap: " substr($0, 4); fflush() }'; then
        tail -n 30 "${log}" >&2
        die "debootstrap failed (full log: ${log}); run build again to retry"
    fi

    say "[2/4] installing minicondor in the chroot"
    # No service may start while packages are configured.
    printf '#!/bin/sh\nexit 101\n' >"${POOL_DIR}/usr/sbin/policy-rc.d"
    chmod 755 "${POOL_DIR}/usr/sbin/policy-rc.d"
    mkdir -p "${POOL_DIR}/proc"
    mount_once "${POOL_DIR}/proc" -t proc proc
    # Unmount proc again whatever happens below.
    trap 'umount "${POOL_DIR}/proc" 2>/dev/null || umount -l "${POOL_DIR}/proc" 2>/dev/null || true' EXIT
    local apt_log="${POOL_DIR}.apt.log"
    : >"${apt_log}"
    local -a apt=(apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    in_chroot "${apt[@]}" update >>"${apt_log}" 2>&1 || { tail -n 30 "${apt_log}" >&2; die "apt-get update failed in the chroot (log: ${apt_log})"; }
    # python3-cryptography depends on the virtual python3-cffi-backend, which can
    # stop dpkg half-way; finish with -f install and name the package explicitly.
    if ! in_chroot "${apt[@]}" install --no-install-recommends python3-cffi-backend minicondor >>"${apt_log}" 2>&1; then
        say "    first install attempt stopped; apt-get -f install and retry (python3-cffi-backend)"
        in_chroot "${apt[@]}" -f install >>"${apt_log}" 2>&1 || true
        in_chroot "${apt[@]}" install --no-install-recommends python3-cffi-backend minicondor >>"${apt_log}" 2>&1 \
            || { tail -n 30 "${apt_log}" >&2; die "installing minicondor failed (log: ${apt_log})"; }
    fi
    in_chroot dpkg --configure -a >>"${apt_log}" 2>&1 || true
    # shellcheck disable=SC2016  # dpkg-query's own ${field} syntax
    [ "$(in_chroot dpkg-query -W -f='${Status}' minicondor 2>/dev/null)" = "install ok installed" ] \
        || die "minicondor is not fully installed (log: ${apt_log})"
    in_chroot apt-get clean >/dev/null 2>&1 || true
    # shellcheck disable=SC2016
    say "    $(in_chroot dpkg-query -W -f='${Package} ${Version}' condor) installed"

    say "[3/4] job user, condor config, /etc/hosts, CA bundle"
    configure_chroot

    umount "${POOL_DIR}/proc" 2>/dev/null || umount -l "${POOL_DIR}/proc"
    trap - EXIT
    say "[4/4] done"
    # shellcheck disable=SC2016
    {
        echo "recipe=${RECIPE_VERSION}"
        echo "finished=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "suite=${SUITE}"
        echo "condor=$(in_chroot dpkg-query -W -f='${Version}' condor)"
    } >"${STAMP}.tmp"
    mv -f "${STAMP}.tmp" "${STAMP}"
    say "built ${POOL_DIR} in $(( $(date +%s) - started )) s, $(du -sh --one-file-system "${POOL_DIR}" | cut -f1) on disk"
}

# --- start / status / stop ---------------------------------------------------

default_binds() {
    local python prefix
    echo "${REPO_ROOT}"
    python="${REPO_ROOT}/.venv/bin/python"
    if [ -x "${python}" ]; then
        prefix="$("${python}" -c 'import sys; print(sys.base_prefix)' 2>/dev/null || true)"
        prefix="$(realpath -m -- "${prefix}")"
        case "${prefix}" in
            "" | / | /usr | /usr/local | /bin | /lib | /opt)
                warn "not bind-mounting the venv's base Python ${prefix:-?} (a system directory); jobs cannot use .venv"
                ;;
            */.pyenv/*) echo "${prefix%%/.pyenv/*}/.pyenv" ;;
            *) echo "${prefix}" ;;
        esac
    else
        warn "${python} missing: only the repository is bind-mounted"
    fi
}

bind_paths() {
    local list=() path
    if [ -n "${CKPT_TASKS_POOL_BINDS:-}" ]; then
        IFS=':' read -r -a list <<<"${CKPT_TASKS_POOL_BINDS}"
    else
        mapfile -t list < <(default_binds)
    fi
    for path in "${list[@]}"; do
        [ -n "${path}" ] || continue
        case "${path}" in
            /*) ;;
            *) die "CKPT_TASKS_POOL_BINDS: not an absolute path: ${path}" ;;
        esac
        [ -e "${path}" ] || die "bind path does not exist on the host: ${path}"
        path="$(realpath -- "${path}")"
        case "${path}" in
            / | /proc | /proc/* | /dev | /dev/* | /sys | /sys/*) die "refusing to bind ${path} into the chroot" ;;
            "${POOL_DIR}" | "${POOL_DIR}"/*) die "bind path lies inside the pool: ${path}" ;;
        esac
        case "${POOL_DIR}/" in
            "${path}"/*) die "bind path contains the pool directory: ${path}" ;;
        esac
        echo "${path}"
    done | awk '{ print length($0) "\t" $0 }' | sort -n -k1,1 | cut -f2- | awk '!seen[$0]++'
}

mount_all() {
    mkdir -p "${POOL_DIR}/proc" "${POOL_DIR}/dev/shm" "${POOL_DIR}/dev/pts"
    mount_once "${POOL_DIR}/proc" -t proc proc
    mount_once "${POOL_DIR}/dev/shm" -t tmpfs -o mode=1777,nosuid,nodev shm
    mount_once "${POOL_DIR}/dev/pts" --bind /dev/pts
    local path target
    while IFS= read -r path; do
        target="${POOL_DIR}${path}"
        if [ -d "${path}" ]; then
            mkdir -p -- "${target}"
        else
            mkdir -p -- "$(dirname -- "${target}")"
            [ -e "${target}" ] || touch -- "${target}"
        fi
        mount_once "${target}" --bind "${path}"
    done < <(bind_paths)
}

pool_answers() {  # slots > 0 and condor_q works
    local slots
    slots="$(timeout 20 env -i PATH="${CHROOT_PATH}" "${CHROOT}" "${POOL_DIR}" condor_status -af Name 2>/dev/null | grep -c . || true)"
    [ "${slots:-0}" -ge 1 ] || return 1
    timeout 20 env -i PATH="${CHROOT_PATH}" "${CHROOT}" "${POOL_DIR}" condor_q -totals >/dev/null 2>&1
}

show_logs() {
    local f
    for f in MasterLog CollectorLog SchedLog StartLog NegotiatorLog; do
        if [ -f "${POOL_DIR}/var/log/condor/${f}" ]; then
            echo "--- ${f} (last 15 lines) ---" >&2
            tail -n 15 "${POOL_DIR}/var/log/condor/${f}" >&2
        fi
    done
}

print_state() {
    local pids
    pids="$(master_pids | paste -sd " ")"
    if [ -n "${pids// /}" ]; then
        say "condor_master running (pid ${pids% })"
    else
        say "condor_master not running"
    fi
    say "mounts: $(pool_mounts | tac | sed "s|^${POOL_DIR}|<pool>|" | tr '\n' ' ')"
    [ -n "${pids// /}" ] || return 0
    echo "--- condor_status ---"
    timeout 20 env -i PATH="${CHROOT_PATH}" "${CHROOT}" "${POOL_DIR}" condor_status 2>&1 || true
    echo "--- condor_q ---"
    timeout 20 env -i PATH="${CHROOT_PATH}" "${CHROOT}" "${POOL_DIR}" condor_q -allusers 2>&1 || true
}

cmd_start() {
    require_root
    require_built
    take_lock
    local other
    other="$(other_masters)"
    [ -z "${other}" ] || die "another HTCondor pool runs on this host (condor_master ${other}); \
its daemons use the same port 9618, so only one pool can run at a time"
    configure_chroot
    mount_all
    in_chroot install -d -o condor -g condor -m 755 /run/condor /run/lock/condor
    if master_running; then
        say "condor_master already running (pid $(master_pids | paste -sd " "))"
        # The configuration was just rewritten: running daemons read it again.
        in_chroot condor_reconfig >/dev/null 2>&1 || warn "condor_reconfig failed"
    else
        say "starting condor_master"
        # Detached from our session, stdio and lock (fd 9): it daemonises and must
        # hold neither the caller's pipes nor the lock open.
        env -i PATH="${CHROOT_PATH}" HOME=/root LANG=C.UTF-8 \
            setsid "${CHROOT}" "${POOL_DIR}" /usr/sbin/condor_master </dev/null >/dev/null 2>&1 9>&- \
            || die "condor_master failed to start"
    fi
    local deadline=$(( $(date +%s) + START_TIMEOUT ))
    until pool_answers; do
        if [ "$(date +%s)" -ge "${deadline}" ]; then
            show_logs
            die "pool not usable after ${START_TIMEOUT} s (no slot in condor_status or condor_q fails)"
        fi
        master_running || { show_logs; die "condor_master exited during start"; }
        sleep 1
    done
    say "pool is up"
    print_state
}

cmd_status() {
    require_root
    if ! is_built; then
        say "no finished pool in ${POOL_DIR}"
        return 1
    fi
    print_state
    if master_running && pool_answers; then
        say "pool is up"
        return 0
    fi
    say "pool is down"
    return 1
}

cmd_stop() {
    require_root
    if [ ! -d "${POOL_DIR}" ]; then
        say "no pool directory ${POOL_DIR}; nothing to stop"
        return 0
    fi
    take_lock
    if master_running; then
        say "condor_off -master"
        timeout 30 env -i PATH="${CHROOT_PATH}" "${CHROOT}" "${POOL_DIR}" condor_off -master 2>&1 | sed 's/^/htcondor_pool:     /' || true
        local deadline=$(( $(date +%s) + 60 ))
        while [ -n "$(chroot_pids)" ] && [ "$(date +%s)" -lt "${deadline}" ]; do
            sleep 0.5
        done
        if [ -n "$(chroot_pids)" ]; then
            warn "daemons still running 60 s after condor_off"
        else
            say "all condor daemons exited"
        fi
    else
        say "condor_master not running"
    fi
    kill_chroot_processes
    unmount_all
    say "pool stopped, nothing mounted under ${POOL_DIR}"
}

# --- main -------------------------------------------------------------------

main() {
    local sub="${1:-}"
    [ "$#" -gt 0 ] && shift
    case "${sub}" in
        build) cmd_build ;;
        start) cmd_start ;;
        status) cmd_status ;;
        stop) cmd_stop ;;
        exec | root-exec)
            [ "$#" -gt 0 ] || die "usage: $0 ${sub} CMD..."
            require_root
            require_built
            if [ "${sub}" = exec ]; then
                in_chroot getent passwd "${JOB_USER}" >/dev/null || die "no user ${JOB_USER} in the chroot; run: $0 build"
                run_in_chroot "${JOB_USER}" "$@"
            else
                run_in_chroot root "$@"
            fi
            ;;
        -h | --help | help) usage ;;
        "") usage >&2; exit 2 ;;
        *) echo "htcondor_pool: unknown subcommand '${sub}'" >&2; usage >&2; exit 2 ;;
    esac
}

main "$@"

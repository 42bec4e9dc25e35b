#!/bin/sh
# The image's entrypoint (under tini): make the container's cgroup v2 tree
# usable for carod's per-job cgroups, then exec carod with the arguments.
#
# With a private cgroup namespace (docker's default on cgroup v2 hosts) the
# container's processes sit in the root of its cgroup tree, and the kernel
# refuses to enable controllers for child cgroups of a cgroup that holds
# processes ("no internal processes"). So, as docker's own docker-in-docker
# image does, move every process into a child cgroup `init` and enable the
# cpu, memory and pids controllers below the root; carod then finds its
# cgroup (/init), moves itself into /init/supervisor and makes its job
# cgroups next to it (carod/sandbox/cgroup.py).
#
# Nothing is done unless all of this holds: root, cgroup v2 mounted on
# /sys/fs/cgroup and writable (docker mounts it read-only unless the container
# is --privileged), and this process at the root of its cgroup namespace (with
# --cgroupns=host the path is the container's own cgroup, which carod handles
# itself). Whatever is missing, carod's start-up log says which layers it has.
set -eu

cgroup=/sys/fs/cgroup

nest_cgroups() {
    [ "$(id -u)" = 0 ] || return 0
    [ -f "$cgroup/cgroup.controllers" ] || return 0
    [ "$(cat /proc/self/cgroup)" = "0::/" ] || return 0
    [ -w "$cgroup/cgroup.subtree_control" ] || return 0
    available=" $(cat "$cgroup/cgroup.controllers") "
    enable=""
    for controller in cpu memory pids; do
        case "$available" in
            *" $controller "*) enable="$enable +$controller" ;;
        esac
    done
    [ -n "$enable" ] || return 0
    mkdir -p "$cgroup/init" || return 0
    # A process may come or go meanwhile (docker exec): try a few times.
    for _ in 1 2 3; do
        while read -r pid; do
            echo "$pid" >"$cgroup/init/cgroup.procs" 2>/dev/null || :
        done <"$cgroup/cgroup.procs"
        if echo "$enable" >"$cgroup/cgroup.subtree_control" 2>/dev/null; then
            return 0
        fi
    done
    echo "carod-entrypoint: could not enable${enable} in $cgroup/cgroup.subtree_control;" \
        "carod will run without those limits" >&2
}

nest_cgroups
exec carod "$@"

# carod, the execute node, in a container. docs/operations.md ("In a container")
# says what each docker option gives; compose.yaml is a pool to try on a laptop.
#
#   docker build -t carod:dev .
#   docker run -d --name carod --stop-timeout 75 \
#       -e CAROD_BROKER_URL=amqp://user:pass@broker:5672/ \
#       -v carod-state:/var/lib/carod carod:dev
#
# carod runs as root in the container and starts each job as `nobody` (or as
# the slot users carod-slot1..16). The full sandbox (bubblewrap and a cgroup
# per job) needs --privileged; without it carod logs a `WARNING sandbox:` line
# for each missing layer and runs with the others. Non-root: --user carod with
# the settings in docs/operations.md (jobs then run as carod too).

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: carod and its dependencies (all wheels, nothing to compile)
# installed under /install, which the runtime stage copies as it is.
# --ignore-installed: every dependency goes to /install, even one that the
# build stage's own Python happens to have already.
FROM ${PYTHON_IMAGE} AS build
# python-qpid-proton (the AMQP 1.0 codec) is built from its source: a C compiler, in this stage only.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY carod ./carod
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --ignore-installed --prefix=/install .

# ---- runtime
FROM ${PYTHON_IMAGE}

# bubblewrap: the job's namespaces and read-only view of the system;
# util-linux: setpriv, which drops each job to its user (already in the base);
# btrfs-progs: mkfs.btrfs for the sandboxes' size-capped image (used when the
#   container may set up loop devices, e.g. --privileged; docs/operations.md);
# tini: PID 1, passes docker's SIGTERM to carod and reaps orphaned job processes;
# slirp4netns: jobs' network with [sandbox] network = outbound | services.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bubblewrap btrfs-progs slirp4netns tini util-linux \
 && rm -rf /var/lib/apt/lists/* \
 && bwrap --version && setpriv --version && tini --version

COPY docker/entrypoint.sh /usr/local/bin/carod-entrypoint
COPY docker/healthcheck.py /usr/local/bin/carod-healthcheck

# Users, with fixed ids so that volume ownership is predictable:
#   nobody       65534     (from the base image) the default [node] job_user
#   carod-slotN  10000+N   N = 1..16, for [sandbox] slot_users (one per running job)
#   carod        10000     runs carod in the non-root mode; its jobs run as carod too
RUN useradd --no-log-init --no-create-home --uid 10000 --user-group \
        --home-dir /var/lib/carod-user --shell /usr/sbin/nologin carod \
 && for i in $(seq 1 16); do \
        useradd --no-log-init --no-create-home --uid $((10000 + i)) --user-group \
            --home-dir /nonexistent --shell /usr/sbin/nologin "carod-slot$i"; \
    done \
 && install -d -m 0711 /var/lib/carod \
 && install -d -m 0700 -o carod -g carod /var/lib/carod-user \
 && chmod 0755 /usr/local/bin/carod-entrypoint /usr/local/bin/carod-healthcheck

COPY --from=build /install /usr/local
# The documented defaults. Mount your own file over it, or set CAROD_<SECTION>_<KEY>.
COPY etc/carod.conf /etc/carod/carod.conf
# It can hold the broker's password: readable by root and the carod group only
# (jobs never see it: carod hides it from them).
RUN chown root:carod /etc/carod/carod.conf && chmod 0640 /etc/carod/carod.conf

# Prometheus metrics on every address of the container (publish them with
# -p 9100:9100); the HEALTHCHECK scrapes them over loopback. The environment
# overrides the config file: change the port with -e CAROD_METRICS_PORT=...
ENV CAROD_METRICS_PORT=9100 \
    CAROD_METRICS_ADDRESS=0.0.0.0
EXPOSE 9100

# journal.sqlite3, results/ and the running jobs' sandboxes. Keep it across
# restarts and upgrades: -v carod-state:/var/lib/carod
VOLUME /var/lib/carod
# `carod submit` unpacks results into the working directory.
WORKDIR /tmp

# carod answers a scrape only while its event loop does (it waits 5 s for the
# loop, then answers 503); the check waits 8 s for the answer.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/carod-healthcheck"]

# SIGTERM drains: no new jobs, running ones get [node] drain_timeout_s to finish.
# Let docker wait longer than that: docker run --stop-timeout, compose stop_grace_period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "/usr/local/bin/carod-entrypoint"]
CMD []

#!/usr/bin/env bash
# Install a raiox wheel as a new release and switch to it, or roll back.
#
#   install-release.sh /tmp/raiox-0.2.0-py3-none-any.whl
#
# Runs on the server as the unprivileged deploy user (.github/workflows/deploy.yml
# copies the wheel and this script there). Layout under RAIOX_PREFIX (/opt/raiox):
#   releases/<version>-<UTC time>/   one virtualenv per release
#   current -> releases/...          what the systemd units run
# Steps: new venv + pip install; migrations (raiox-migrate@<release>.service, as the
# raiox user with the unit's environment file, which the deploy user cannot read);
# switch `current` atomically; restart the server; poll /healthcheck. When the check
# fails, `current` goes back to the previous release, the server is restarted on it
# and the script exits 1. Migrations are not undone: raiox refuses a schema newer
# than it knows, so a release whose migrations ran cannot be rolled back by this
# script alone (restore the backup taken before; README "Deploying").
#
# The deploy user needs only (sudoers, e.g. /etc/sudoers.d/raiox-deploy):
#   deploy ALL=(root) NOPASSWD: /usr/bin/systemctl restart raiox-server.service, \
#          /usr/bin/systemctl start raiox-migrate@*.service
set -euo pipefail

WHEEL=${1:?usage: install-release.sh WHEEL}
PREFIX=${RAIOX_PREFIX:-/opt/raiox}
PYTHON=${RAIOX_PYTHON:-python3}
SYSTEMCTL=${RAIOX_SYSTEMCTL:-sudo -n systemctl}
SERVICE=${RAIOX_SERVICE:-raiox-server.service}
HEALTH_URL=${RAIOX_HEALTH_URL:-http://127.0.0.1:8000/healthcheck}
HEALTH_TRIES=${RAIOX_HEALTH_TRIES:-30}
HEALTH_DELAY=${RAIOX_HEALTH_DELAY:-2}
KEEP=${RAIOX_KEEP_RELEASES:-5}
PIP_ARGS=${RAIOX_PIP_ARGS:-}

say() { printf 'install-release: %s\n' "$*" >&2; }

healthy() {
    local try
    for ((try = 1; try <= HEALTH_TRIES; try++)); do
        if curl -fsS --max-time 5 "$HEALTH_URL" >/dev/null 2>&1; then
            return 0
        fi
        sleep "$HEALTH_DELAY"
    done
    return 1
}

switch_to() {  # atomically point `current` at a release folder name
    ln -sfn "releases/$1" "$PREFIX/current.new"
    mv -T "$PREFIX/current.new" "$PREFIX/current"
}

[[ -f $WHEEL ]] || { say "no wheel at $WHEEL"; exit 2; }
version=$(basename "$WHEEL" | cut -d- -f2)
name="$version-$(date -u +%Y%m%dT%H%M%SZ)"
release="$PREFIX/releases/$name"
previous=""
if [[ -L $PREFIX/current ]]; then
    previous=$(basename "$(readlink "$PREFIX/current")")
fi

mkdir -p "$PREFIX/releases"
say "installing $WHEEL into $release"
"$PYTHON" -m venv "$release"
# shellcheck disable=SC2086  # PIP_ARGS is a list of options
"$release/bin/pip" install --quiet $PIP_ARGS "$WHEEL"
"$release/bin/raiox" --version >/dev/null

say "migrating the database with $name"
$SYSTEMCTL start "raiox-migrate@$name.service"

switch_to "$name"
say "restarting $SERVICE on $name"
$SYSTEMCTL restart "$SERVICE"
if healthy; then
    say "$name is live (previous: ${previous:-none})"
    # Keep the newest $KEEP releases, and always current and previous.
    find "$PREFIX/releases" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort -r |
        tail -n "+$((KEEP + 1))" | while read -r old; do
            if [[ $old != "$name" && $old != "$previous" ]]; then
                rm -rf "${PREFIX:?}/releases/$old"
            fi
        done
    exit 0
fi

say "$name failed its health check ($HEALTH_URL)"
if [[ -z $previous ]]; then
    say "no previous release to roll back to"
    exit 1
fi
switch_to "$previous"
$SYSTEMCTL restart "$SERVICE"
if healthy; then
    say "rolled back to $previous"
else
    say "rolled back to $previous, which is not healthy either: look at journalctl -u $SERVICE"
fi
exit 1

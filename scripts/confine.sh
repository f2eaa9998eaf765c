#!/bin/sh
# Run a command with ROS 2 / DDS traffic confined to this machine.
#
# Always: localhost-only discovery. When allowed (root, or unprivileged user namespaces): a
# private network namespace whose only interface is loopback, so no discovery multicast can
# leave the machine whatever a DDS vendor does.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
if command -v unshare >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then
  for flags in "-n" "-rn"; do
    if unshare $flags true 2>/dev/null; then
      exec unshare $flags sh -c 'ip link set lo up && exec "$@"' confine "$@"
    fi
  done
fi
echo "confine.sh: no private network namespace here; relying on ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST" >&2
exec "$@"

"""A child process for kill -9 tests, run as
`python -c 'import registry_child; registry_child.main()' pull|build NAME`."""

import json
import sys

from fakebuilders import slow_builder
from krasis_registry import Registry


def main() -> None:
    command, name = sys.argv[1], sys.argv[2]
    if command == "pull":
        events = Registry().pull(name, build_caches=False)
    else:
        registry = Registry(cache_builders={"cpu": slow_builder}, group_size=128)
        events = registry.build_caches(name, ["cpu"])
    for event in events:
        print(json.dumps(event), flush=True)

"""The install as a user gets it: one `transfer_flow` namespace, nothing generic at the top of site-packages."""
import os
import subprocess
import sys

GENERIC = ("flows", "tasks", "storage", "deployments")


def test_only_the_transfer_flow_namespace_is_importable_outside_the_checkout(tmp_path):
    probe = (
        "import importlib.util as u, json; "
        f"print(json.dumps({{n: u.find_spec(n) is not None for n in {GENERIC!r}}}), "
        "all(u.find_spec('transfer_flow.' + n) is not None for n in " + repr(GENERIC) + "))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    generic, namespaced = done.stdout.strip().rsplit(" ", 1)
    assert generic == '{"flows": false, "tasks": false, "storage": false, "deployments": false}'
    assert namespaced == "True"

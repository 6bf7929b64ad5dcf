"""cluster/: launcher YAMLs validate against Ray's own schema, KubeRay manifests are safe by construction,
cluster/local.sh argument checks. The running local cluster (up, token auth, down) is exercised in test_submit.py
through the fixtures in fixtures_cluster.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures_cluster import LOCAL_SH

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]


def _load(rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / rel).read_text()) if d]


@pytest.mark.parametrize("rel", LAUNCHER)
def test_launcher_yaml_validates_against_ray_schema(rel):
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    (config,) = _load(rel)
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # CPU head runs drivers only
    gpu = [t for name, t in types.items() if "gpu" in name]
    assert len(gpu) == 1 and gpu[0]["min_workers"] < gpu[0]["max_workers"]  # autoscaling GPU group
    assert any("uninstall -y faiss-cpu" in c and "rayhash[cloud,gpu]" in c for c in gpu[0]["worker_setup_commands"])
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in starts  # Jobs API only through an SSH tunnel
    setup = " ".join(config["setup_commands"])
    assert "~/.ray/auth_token" in setup and ("secretsmanager" in setup or "gcloud secrets" in setup)
    assert "RAYHASH_STORAGE=" in setup


@pytest.mark.parametrize("rel", LAUNCHER + KUBERAY)
def test_no_secret_values_in_cluster_configs(rel):
    text = (CLUSTER / rel).read_text()
    # Generated tokens are long hex runs (openssl rand -hex 32); only commands that fetch them may appear.
    assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text)
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", text)
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key ids


def _ray_pods(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return [spec["headGroupSpec"]] + spec["workerGroupSpecs"]


@pytest.mark.parametrize("rel", KUBERAY)
def test_kuberay_token_from_secret_clusterip_and_gpu_group(rel):
    docs = _load(rel)
    ray_doc = next(d for d in docs if d["kind"] in ("RayCluster", "RayJob"))
    spec = ray_doc["spec"].get("rayClusterSpec", ray_doc["spec"])
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert not any(d["kind"] in ("Ingress", "Service") for d in docs)
    for group in _ray_pods(ray_doc):
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rayhash-ray-auth"
            assert "value" not in env["RAY_AUTH_TOKEN"]
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu and gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    if ray_doc["kind"] == "RayJob":
        sub = ray_doc["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]
        assert {e["name"] for e in sub} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
        assert "jobs/pipeline.py" in ray_doc["spec"]["entrypoint"]


def test_local_sh_usage_and_bad_worker_count():
    usage = subprocess.run(["bash", str(LOCAL_SH)], capture_output=True, text=True)
    assert usage.returncode == 2 and "up [N_WORKERS]" in usage.stdout
    bad = subprocess.run(["bash", str(LOCAL_SH), "up", "two"], capture_output=True, text=True,
                         env={**os.environ, "RAYHASH_LOCAL_DIR": "/tmp/rh-never-created"})
    assert bad.returncode == 1 and "N_WORKERS must be a number" in bad.stderr


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod the manifest creates: Ray head and worker groups, and a RayJob's submitter."""
    out = [("ray", g["template"]["spec"]) for g in _ray_pods(doc)]
    if doc["kind"] == "RayJob":
        out.append(("submitter", doc["spec"]["submitterPodTemplate"]["spec"]))
    return out


@pytest.mark.parametrize("rel", KUBERAY)
def test_kuberay_pods_pinned_non_root_unprivileged_with_dev_shm(rel):
    ray_doc = next(d for d in _load(rel) if d["kind"] in ("RayCluster", "RayJob"))
    specs = _pod_specs(ray_doc)
    assert len(specs) >= 3
    for role, spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for c in spec["containers"]:
            assert re.fullmatch(r"[^@\s]+@sha256:\S+", c["image"]), c["image"]  # pinned by digest, not a tag
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            if role == "ray":  # Ray's object store lives in /dev/shm: 64 MB in a container unless mounted
                mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
                volume = next(v for v in spec["volumes"] if v["name"] == mounts["/dev/shm"])
                assert volume["emptyDir"]["medium"] == "Memory"


def test_ray_pinned_to_a_version_that_enforces_token_auth():
    """Below Ray 2.52 the token-auth setting is silently ignored: the project must not install one."""
    import tomllib

    deps = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if re.match(r"ray\b|ray\[", d)]
    m = re.search(r">=\s*(\d+)\.(\d+)", ray)
    assert m and (int(m.group(1)), int(m.group(2))) >= (2, 52), ray


def test_local_sh_refuses_a_state_folder_others_can_write(tmp_path):
    """A predictable name under /tmp could be planted by another user: local.sh uses it only when it is a folder
    of ours with no group or other permissions."""
    planted = tmp_path / "state"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    env = {**os.environ, "RAYHASH_LOCAL_DIR": str(planted), "RAYHASH_LOCAL_PORT": "26990"}
    r = subprocess.run(["bash", str(LOCAL_SH), "up", "0"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "open to other users (mode 777)" in r.stderr and "chmod 700" in r.stderr
    link = tmp_path / "link"
    link.symlink_to(planted)
    r = subprocess.run(["bash", str(LOCAL_SH), "up", "0"], capture_output=True, text=True,
                       env={**env, "RAYHASH_LOCAL_DIR": str(link)}, timeout=120)
    assert r.returncode == 1 and "not a folder owned by you" in r.stderr
    assert not any(planted.iterdir())  # nothing written into it


def test_faiss_packages_are_exclusive_extras_and_both_installed_is_refused(tmp_path):
    """faiss-cpu and faiss-gpu-cu12 write the same `faiss` module: the base install names neither, each extra names
    exactly one, and an environment holding both is refused by name (what pip's metadata on sys.path shows)."""
    import tomllib

    project = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]
    faiss_of = lambda deps: [d for d in deps if d.startswith("faiss")]  # noqa: E731
    assert faiss_of(project["dependencies"]) == []
    extras = project["optional-dependencies"]
    assert [re.split(r"[<>=]", d)[0] for d in faiss_of(extras["cpu"])] == ["faiss-cpu"]
    assert [re.split(r"[<>=]", d)[0] for d in faiss_of(extras["gpu"])] == ["faiss-gpu-cu12"]
    site = tmp_path / "site" / "faiss_gpu_cu12-1.14.1.post1.dist-info"
    site.mkdir(parents=True)
    (site / "METADATA").write_text("Metadata-Version: 2.1\nName: faiss-gpu-cu12\nVersion: 1.14.1.post1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(CLUSTER.parent)])}
    r = subprocess.run([sys.executable, "-c", "import rayhash.index"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1 and "faiss-cpu and faiss-gpu-cu12 are both installed" in r.stderr, r.stderr[-2000:]
    assert subprocess.run([sys.executable, "-c", "import rayhash.index"], capture_output=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(CLUSTER.parent)}).returncode == 0


def _cuda_majors(installs: dict[str, str]) -> set[int]:
    """CUDA major versions a resolved environment brings: `-cuNN` package suffixes, and the version of the CUDA
    runtime / toolkit packages that carry none (CUDA 13's `nvidia-cuda-runtime`, `cuda-toolkit`)."""
    majors = {int(m.group(1)) for n in installs if (m := re.search(r"-cu(\d+)$", n))}
    majors |= {int(v.split(".")[0]) for n, v in installs.items() if n in ("nvidia-cuda-runtime", "cuda-toolkit")}
    return majors


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["cpu", "gpu"])
def test_pip_resolves_each_extra_to_one_faiss(tmp_path, extra):
    """`pip install --dry-run --report` of `rayhash[cpu]` and `rayhash[gpu]`: exactly one faiss distribution each.
    CUDA majors: `cpu` brings torch's CUDA 13 only; `gpu` adds faiss-gpu-cu12's CUDA 12 (no faiss wheel with sm_90
    kernels installs beside torch 2.14's CUDA 13.0: faiss-gpu-cuvs 1.15 needs CUDA >= 13.2), so rayhash keeps them
    in separate processes: nothing that opens an index imports torch (checked below)."""
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--disable-pip-version-check", "--report", str(report), f"{CLUSTER.parent}[{extra}]"],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode and re.search(r"(No matching distribution found|Could not find a version that satisfies the "
                                  r"requirement) (?!faiss)", r.stderr):  # offline: no index; a faiss miss fails
        pytest.skip(f"no package index reachable here: {r.stderr.strip().splitlines()[-1][:200]}")
    assert r.returncode == 0, r.stderr[-3000:]
    installs = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert "torch" in installs and "ray" in installs
    faiss = {"cpu": ["faiss-cpu"], "gpu": ["faiss-gpu-cu12"]}[extra]
    assert sorted(n for n in installs if n.startswith("faiss")) == faiss
    assert _cuda_majors(installs) == {"cpu": {13}, "gpu": {12, 13}}[extra], sorted(installs)
    code = ("import sys, rayhash.index, rayhash.index.sharded, rayhash.index.build, rayhash.index.cli, "
            "rayhash.eval.evaluate; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(CLUSTER.parent)})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("node, flag, workers", [(0, "--head", 0), (1, "--address", 1)], ids=["head", "worker"])
def test_local_sh_starts_a_node_again_when_its_first_start_dies(tmp_path, node, flag, workers):
    """Ray gives a starting node 30 s to register with its GCS; on a loaded machine a node can miss that and exit
    ("The current node timed out during startup"). local.sh starts it once more, the head as a worker node. Here the
    first start of that node exits at once with that message (a wrapper in front of the real `ray`), the second is
    the real one."""
    from fixtures_cluster import local_cluster

    real = Path(sys.executable).parent / "ray"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    mark = tmp_path / "failed-once"
    wrapper = bin_dir / "ray"
    wrapper.write_text("#!/bin/bash\n"
                       f'if [[ "$*" == *{flag}* && ! -e {mark} ]]; then touch {mark}; '
                       'echo "Exception: The current node timed out during startup." >&2; exit 1; fi\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    with local_cluster(workers=workers, RAYHASH_RAY=str(wrapper)) as c:
        assert mark.exists()
        assert "timed out during startup" in (c.dir / f"node-{node}.failed.log").read_text()
        nodes = subprocess.run(["curl", "-sf", f"{c.address}/api/v0/nodes?limit=100"], capture_output=True, text=True,
                               timeout=60)
        assert nodes.returncode == 0, nodes.stderr
        alive = [n for n in json.loads(nodes.stdout)["data"]["result"]["result"] if n["state"] == "ALIVE"]
        assert len(alive) == workers + 1, nodes.stdout[:2000]

"""What the sandbox tells operators: the layers in force, and what this host lacks."""

from __future__ import annotations

from typing import Any


def what_is_missing(sb: Any) -> list[tuple[str, str]]:
    assert sb._probe is not None and sb._plan is not None
    pr, p = sb._probe, sb._plan
    out: list[tuple[str, str]] = []
    e2e = pr.get("e2e", {})
    if not e2e.get("ok"):
        out.append(
            (
                "end-to-end trial",
                f"even the weakest stack failed its trial ({e2e.get('error')}): kernels "
                "may fail to start",
            )
        )
    if p.isolation == "unshare":
        out.append(
            (
                "bwrap",
                f"{pr['bwrap'].get('reason')}; using the unshare fallback (same view, "
                "mounts done by the launcher)",
            )
        )
    elif p.isolation == "none":
        what = (
            f"Landlock ABI {p.landlock_abi} confines files and TCP only"
            if p.landlock_abi
            else "nothing confines the filesystem beyond file permissions"
        )
        out.append(
            (
                "namespaces (bwrap and unshare)",
                f"bwrap: {pr['bwrap'].get('reason')}; unshare: "
                f"{pr['unshare'].get('reason')}. Kernels see host processes and paths; " + what,
            )
        )
        if not p.landlock_abi:
            out.append(("landlock", pr["landlock"].get("reason") or "unavailable"))
    if p.root and not p.uid:
        out.append(
            (
                "uid",
                f"{pr.get('uid', {}).get('reason')}; kernels keep uid 0 without any "
                "capability, each with a gid of its own (its sockets, connection file and "
                "process memory stay out of other kernels' reach; root-owned files with owner "
                "access stay readable where Landlock grants them)",
            )
        )
    if not p.root and not p.uses_namespaces:
        out.append(
            (
                "uid",
                "kernels run as the server's own uid: without a pid namespace one kernel can "
                "connect to another's ipc sockets and read its output",
            )
        )
    if not sb._quota_ok:
        out.append(
            (
                "disk quota",
                f"{sb._quota_reason}; a kernel's files are bounded per file "
                "(RLIMIT_FSIZE), not in total",
            )
        )
    if not p.seccomp:
        out.append(
            (
                "seccomp",
                f"{pr['seccomp'].get('reason')}; ptrace, mount, bpf, keyctl, ... are not filtered",
            )
        )
    cg = pr.get("cgroups", {})
    if not cg.get("limits"):
        bound = (
            "a fork bomb is bounded only by RLIMIT_NPROC of the session's own uid"
            if p.uid
            else "NOTHING bounds processes or memory: memfd and shared mappings escape "
            "RLIMIT_DATA, and with a shared uid RLIMIT_NPROC cannot help"
        )
        out.append(("cgroup limits", f"no memory/CPU/pids cap beyond per-process rlimits; {bound}"))
    if not cg.get("ok"):
        if p.uid:
            sweep = "leftover processes are found by the session's uid, not by cgroup"
        elif p.uses_namespaces:
            sweep = "leftover processes die with the session's pid namespace"
        else:
            sweep = "NOTHING kills a process a kernel left behind (setsid) when its session ends"
        out.append(("cgroup kill", sweep))
    if p.network_isolation is None:
        out.append(("network isolation", "kernels can reach the network"))
    elif p.network_isolation != "namespace":
        out.append(
            (
                "network namespace",
                "egress blocked by Landlock (TCP) + seccomp (UDP/raw, TCP Fast Open) instead",
            )
        )
    return out


def report(sb: Any) -> dict[str, Any]:
    if sb.mode == "off" or sb._plan is None or sb._probe is None:
        reason = "sandbox mode is off" if sb.mode == "off" else "not started"
        names = ("clean_env", "rlimits", "uid", "bwrap", "unshare", "landlock")
        names += ("cgroups", "seccomp", "network_isolation")
        return {
            "mode": sb.mode,
            "isolation": None,
            "layers": {n: {"enabled": False, "reason": reason} for n in names},
        }
    pr, p = sb._probe, sb._plan
    cg = pr.get("cgroups", {})
    kill = (
        "cgroup.kill"
        if cg.get("v2", {}).get("kill")
        else "freezer+SIGKILL"
        if "freezer" in cg.get("v1", {})
        else "SIGKILL by cgroup membership"
        if cg.get("ok")
        else "SIGKILL by uid"
    )
    uid_reason = None
    if not p.uid:
        uid_reason = pr.get("uid", {}).get("reason") or "server is not root"
    layers: dict[str, dict[str, Any]] = {
        "disk_quota": {
            "enabled": sb._quota_ok,
            "reason": sb._quota_reason,
            "detail": "each session's writable tree is a tmpfs with size and inode limits "
            "(tier disk/inodes); /dev/shm is a tmpfs of the tier's shm size",
        },
        "clean_env": {
            "enabled": True,
            "reason": None,
            "detail": "privileged stages run `python -I` with cwd / and a fixed environment; "
            "the kernel's own is applied at the last exec",
        },
        "rlimits": {
            "enabled": p.rlimits,
            "reason": None,
            "limits": ["DATA", "NOFILE", "FSIZE", "CORE", "CPU"] + (["NPROC"] * p.uid),
        },
        "uid": {
            "enabled": p.uid,
            "gid_only": p.gid_only,
            "reason": uid_reason,
            "range": [sb._uids.start, sb._uids.start + sb._uids.count],
            "in_use": len(sb._uids.in_use()),
            "drop": "inside bwrap/unshare (they run as root to bind root-only paths)"
            if p.uid and p.uses_namespaces
            else "in the launcher"
            if p.uid
            else None,
        },
        "bwrap": {
            "enabled": p.isolation == "bwrap",
            "available": bool(pr["bwrap"].get("ok")),
            "path": pr["bwrap"].get("path"),
            "reason": None if p.isolation == "bwrap" else pr["bwrap"].get("reason"),
        },
        "unshare": {
            "enabled": p.isolation == "unshare",
            "available": bool(pr["unshare"].get("ok")),
            "path": pr["unshare"].get("path"),
            "reason": None
            if p.isolation == "unshare"
            else "bwrap preferred"
            if p.isolation == "bwrap" and pr["unshare"].get("ok")
            else pr["unshare"].get("reason"),
        },
        "landlock": {
            "enabled": bool(p.landlock_abi),
            "abi": pr["landlock"].get("abi"),
            "reason": None
            if p.landlock_abi
            else "namespaces in use (Landlock only without them)"
            if p.uses_namespaces and pr["landlock"].get("ok")
            else pr["landlock"].get("reason"),
        },
        "cgroups": {
            "enabled": bool(cg.get("ok")) and sb._cgroup_failed is None,
            "reason": sb._cgroup_failed or cg.get("reason"),
            "limits": cg.get("limits", []),
            "v1": sorted(cg.get("v1", {})),
            "v2_kill": bool(cg.get("v2", {}).get("kill")),
            "kill": kill,
        },
        "seccomp": {
            "enabled": p.seccomp,
            "reason": None if p.seccomp else pr["seccomp"].get("reason"),
            "rules": pr["seccomp"].get("rules"),
            "action": "EPERM",
        },
        "network_isolation": {
            "enabled": p.network_isolation is not None,
            "method": p.network_isolation,
            "reason": None if p.network_isolation else "no namespace, no Landlock TCP rules",
            "per_package_exceptions": sorted(k for k, r in sb.config.packages.items() if r.network),
        },
        "server_undumpable": {
            "enabled": sb._undumpable,
            "reason": None if sb._undumpable else "not needed (pid namespace)",
        },
    }
    return {
        "mode": sb.mode,
        "isolation": p.isolation,
        "probe_ms": pr.get("elapsed_ms"),
        "verified": {
            "ok": bool(pr.get("e2e", {}).get("ok")),
            "error": pr.get("e2e", {}).get("error"),
            "checked": pr.get("e2e", {}).get("result"),
        },
        "missing": [name for name, _ in sb._missing],
        "kernel_spec": sb.kernel_spec,
        "layers": layers,
    }

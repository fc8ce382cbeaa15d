# worker-collapse.py TMPDIR CRIU... : checkpoint bench/coldstart.py's weights app, then eager-restore it
# twice with each criu given and print the supervisor's criu_restore= and MADV_COLLAPSE lines.
import os, sys, time, subprocess
sys.path.insert(0, "/work/wt-thp/bench")
import coldstart as cs
from pathlib import Path
tmp = Path(sys.argv[1]); binary = os.environ["BEAM_WORKER_BINARY"]
app, kwargs, app_env = cs.APPS["weights"]
base = ["--checkpoint-dir", str(tmp / "ck"), "--pass-env", "WEIGHTS_MB"]
env = dict(os.environ, **app_env)
r = cs.Run(binary, app, kwargs, tmp, base + ["--checkpoint-key", "k"], env); time.sleep(1); r.stop()
for criu in sys.argv[2:] * 2:
    env["BEAM_CRIU"] = criu
    r = cs.Run(binary, app, kwargs, tmp, base + ["--checkpoint-key", "k", "--restore", "eager"], env)
    time.sleep(4)
    lines = [l for l in r.text().splitlines() if "COLLAPSE" in l or "criu_restore" in l]
    print(criu.split("/")[3], round(r.seconds * 1000), "ms |", " | ".join(l[:200] for l in lines))
    r.stop()

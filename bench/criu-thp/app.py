# 500 MiB of touched anonymous memory; on SIGUSR1 verify its checksum.
import mmap, os, signal, sys, hashlib, time
N = int(os.environ.get("APP_MIB", "500")) << 20
hg = os.environ.get("APP_HG") == "1"
if hg:
    m = mmap.mmap(-1, N, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)
    buf = memoryview(m)
else:
    buf = memoryview(bytearray(N))
# non-zero, page-varying content so every page is in the image
pat = bytes(range(256)) * 16
for off in range(0, N, 1 << 20):
    chunk = (pat * 256)
    buf[off:off + (1 << 20)] = chunk
    buf[off:off + 8] = off.to_bytes(8, "little")
digest = hashlib.sha256(buf).hexdigest()
out = sys.argv[1]
with open(out + ".pre", "w") as f:
    f.write(digest + "\n")
def on_usr1(*_):
    d = hashlib.sha256(buf).hexdigest()
    with open(out + ".post.%d" % time.time_ns(), "w") as f:
        f.write(("OK " if d == digest else "BAD ") + d + "\n")
    os._exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
open(out + ".ready", "w").close()
while True:
    signal.pause()

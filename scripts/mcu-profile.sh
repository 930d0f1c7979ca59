#!/usr/bin/env bash
# Where the firmware's instructions go: runs the last-built QEMU firmware (scripts/mcu-qemu.sh or
# scripts/mcu-paper.sh build it; pass another ELF as $1) under QEMU's execution trace
# (`-d in_asm,exec,nochain`: every translated block's instructions, and every execution of it),
# counts executions per block with a small C filter (the trace has ~10^8 lines), and prints the
# instructions per function (the outermost non-inlined one, from the ELF's debug information)
# and per innermost inlined function. The counts are QEMU's own, as exact as `-icount`; the
# run covers the whole firmware (predictions, training steps, checkpoints), ~30x slower than
# a plain run. Needs a C compiler and binutils-arm-none-eabi (addr2line).
set -euo pipefail
cd "$(dirname "$0")/.."
elf="${1:-${CARGO_TARGET_DIR_MCU:-$PWD/target/thumb-examples}/thumbv7em-none-eabihf/release/tt-mcu-qemu-mps2-an386}"
top="${TT_MCU_PROFILE_TOP:-25}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/count.c" <<'C'
/* Counts `Trace` lines of QEMU's exec log per block start address (argv[1] gets "addr count"
   lines); every other line (the in_asm listing) passes to stdout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define SLOTS (1u << 20) /* thumb code below 2 MB, halfword-aligned */
static unsigned long long n[SLOTS];
int main(int argc, char **argv) {
  static char line[4096];
  while (fgets(line, sizeof line, stdin)) {
    if (!strncmp(line, "Trace", 5)) {
      char *p = strchr(line, '[');
      if (p && (p = strchr(p, '/'))) {
        unsigned long pc = strtoul(p + 1, NULL, 16);
        if (pc / 2 < SLOTS) n[pc / 2]++;
      }
    } else {
      fputs(line, stdout);
    }
  }
  FILE *o = fopen(argv[1], "w");
  if (!o) return 1;
  for (unsigned i = 0; i < SLOTS; i++)
    if (n[i]) fprintf(o, "%x %llu\n", i * 2, n[i]);
  return fclose(o) != 0;
}
C
cc -O2 -o "$work/count" "$work/count.c"
mkfifo "$work/trace"
"$work/count" "$work/counts" < "$work/trace" > "$work/blocks" &
counter=$!
timeout 3600 qemu-system-arm -M mps2-an386 -nographic -monitor none \
  -semihosting-config enable=on,target=native -icount shift=0 \
  -d in_asm,exec,nochain -D "$work/trace" -kernel "$elf" | grep -v '^update-hex ' | tail -3
wait "$counter"
python3 - "$elf" "$work/blocks" "$work/counts" "$top" <<'PY'
import collections, re, subprocess, sys
elf, blocks, counts, top = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# The instructions of each translated block, by its start address (first translation).
tb, cur = {}, None
for line in open(blocks):
    m = re.match(r"0x([0-9a-f]+):", line)
    if m and cur is not None:
        cur.append(int(m.group(1), 16))
        continue
    if cur:
        tb.setdefault(cur[0], cur)
    cur = [] if line.startswith("IN:") else None
if cur:
    tb.setdefault(cur[0], cur)
per = collections.Counter()
for line in open(counts):
    pc, k = line.split()
    for a in tb.get(int(pc, 16), [int(pc, 16)]):
        per[a] += int(k)
total = sum(per.values())
addrs = sorted(per)
out = subprocess.run(["arm-none-eabi-addr2line", "-f", "-i", "-C", "-e", elf, "-a"]
                     + [hex(a) for a in addrs], capture_output=True, text=True, check=True)
frames, a = {}, None
lines = out.stdout.splitlines()
i = 0
while i < len(lines):
    if lines[i].startswith("0x"):
        a = int(lines[i], 16)
        frames[a] = []
        i += 1
    else:
        frames[a].append(lines[i])
        i += 2
short = lambda f: re.sub(r"<[^<>]*>", "", re.sub(r"<[^<>]*>", "", f))[-100:]
outer, inner = collections.Counter(), collections.Counter()
for a, k in per.items():
    fr = frames.get(a) or ["?"]
    outer[short(fr[-1])] += k
    inner[short(fr[0])] += k
print(f"{total} instructions executed")
for title, c in (("by function", outer), ("by innermost inlined function", inner)):
    print(f"== {title}")
    for name, k in c.most_common(top):
        print(f"{k / 1e6:9.2f} M {100 * k / total:5.1f} %  {name}")
PY

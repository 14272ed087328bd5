/* Hide x86 ISA features from CPUID for one process tree, so that libraries which
 * pick kernels by CPUID (ONNX Runtime's MLAS, LLVM's host detection) run the
 * kernels an older CPU runs -- on this CPU, at its speed.
 *
 * Mechanism: Linux CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0), the flag
 * `cpuid_fault` in /proc/cpuinfo). Every CPUID instruction then raises SIGSEGV;
 * our handler re-enables CPUID for the thread, executes it, clears the bits of
 * the hidden features, disables it again and steps over the instruction. The
 * setting is per thread and inherited by threads created later; LD_PRELOAD
 * carries it into child processes (execve resets it, the constructor sets it).
 * Handlers the program installs for SIGSEGV later (Python's faulthandler) are
 * kept aside and called for every fault that is not a CPUID.
 *
 * Build:  cc -O2 -shared -fPIC -o hide_isa.so hide_isa.c -ldl
 * Use:    PARED_HIDE_ISA=avx512f,avx512_vnni,avx_vnni,amx_int8 LD_PRELOAD=./hide_isa.so CMD
 *         (feature names as /proc/cpuinfo spells them; avx512f hides every AVX-512 subset, an amx_* every AMX part)
 * Check:  PARED_HIDE_ISA_STATUS is set to "active" in the environment when it took.
 * Used by pared's tests and benchmarks (pared.testing.hidden_isa_env).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#ifndef ARCH_SET_CPUID
#define ARCH_SET_CPUID 0x1012
#endif

/* CPUID leaf 7 bits: [subleaf][register: 0 eax, 1 ebx, 2 ecx, 3 edx] */
static uint32_t mask[2][4];
static struct sigaction app_handler;       /* what the program asked for SIGSEGV */
static int active;
typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;

struct feature { const char *name; int sub, reg, bit; };
static const struct feature FEATURES[] = {
  {"avx512f", 0, 1, 16}, {"avx512dq", 0, 1, 17}, {"avx512ifma", 0, 1, 21}, {"avx512pf", 0, 1, 26},
  {"avx512er", 0, 1, 27}, {"avx512cd", 0, 1, 28}, {"avx512bw", 0, 1, 30}, {"avx512vl", 0, 1, 31},
  {"avx512vbmi", 0, 2, 1}, {"avx512_vbmi2", 0, 2, 6}, {"avx512_vnni", 0, 2, 11}, {"avx512_bitalg", 0, 2, 12},
  {"avx512_vpopcntdq", 0, 2, 14}, {"avx512_4vnniw", 0, 3, 2}, {"avx512_4fmaps", 0, 3, 3},
  {"avx512_vp2intersect", 0, 3, 8}, {"avx512_fp16", 0, 3, 23}, {"amx_bf16", 0, 3, 22}, {"amx_tile", 0, 3, 24},
  {"amx_int8", 0, 3, 25}, {"avx_vnni", 1, 0, 4}, {"avx512_bf16", 1, 0, 5}, {"avx_vnni_int8", 1, 3, 4},
  {"avx_ne_convert", 1, 3, 5}, {"avx_vnni_int16", 1, 3, 10},
};
#define NFEATURES (sizeof FEATURES / sizeof FEATURES[0])

static long arch(int code, unsigned long arg) { return syscall(SYS_arch_prctl, code, arg); }

static void on_segv(int sig, siginfo_t *si, void *ctx) {
  ucontext_t *uc = ctx;
  greg_t *g = uc->uc_mcontext.gregs;
  const unsigned char *ip = (const unsigned char *)g[REG_RIP];
  if (ip && ip[0] == 0x0f && ip[1] == 0xa2) {
    uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
    uint32_t r[4] = {leaf, 0, sub, 0};
    arch(ARCH_SET_CPUID, 1);
    __asm__ volatile("cpuid" : "+a"(r[0]), "=b"(r[1]), "+c"(r[2]), "=d"(r[3]));
    arch(ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub < 2)
      for (int i = 0; i < 4; i++) r[i] &= ~mask[sub][i];
    g[REG_RAX] = r[0]; g[REG_RBX] = r[1]; g[REG_RCX] = r[2]; g[REG_RDX] = r[3];
    g[REG_RIP] += 2;
    return;
  }
  /* a real fault: the program's own handler, or the default action */
  if (app_handler.sa_flags & SA_SIGINFO) { if (app_handler.sa_sigaction) { app_handler.sa_sigaction(sig, si, ctx); return; } }
  else if (app_handler.sa_handler != SIG_DFL && app_handler.sa_handler != SIG_IGN) { app_handler.sa_handler(sig); return; }
  struct sigaction dfl; memset(&dfl, 0, sizeof dfl); dfl.sa_handler = SIG_DFL;
  real_sigaction(SIGSEGV, &dfl, NULL);      /* returning re-runs the instruction: it faults again, uncaught */
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
  if (sig != SIGSEGV || !active) return real_sigaction(sig, act, old);
  if (old) *old = app_handler;
  if (act) app_handler = *act;
  return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
  struct sigaction act, old;
  memset(&act, 0, sizeof act);
  act.sa_handler = handler;
  act.sa_flags = SA_RESTART;
  if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
  return old.sa_handler;
}

__attribute__((constructor)) static void hide_isa_init(void) {
  real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
  const char *spec = getenv("PARED_HIDE_ISA");
  if (!spec || !*spec) return;
  char buf[1024];
  strncpy(buf, spec, sizeof buf - 1); buf[sizeof buf - 1] = 0;
  for (char *save = NULL, *tok = strtok_r(buf, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
    /* no AVX-512 subset without avx512f, no AMX part without the others */
    int all512 = strcmp(tok, "avx512f") == 0, allamx = strncmp(tok, "amx", 3) == 0;
    for (unsigned i = 0; i < NFEATURES; i++)
      if (strcmp(tok, FEATURES[i].name) == 0 || (all512 && strncmp(FEATURES[i].name, "avx512", 6) == 0) ||
          (allamx && strncmp(FEATURES[i].name, "amx", 3) == 0))
        mask[FEATURES[i].sub][FEATURES[i].reg] |= 1u << FEATURES[i].bit;
  }
  struct sigaction sa; memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv; sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  if (real_sigaction(SIGSEGV, &sa, &app_handler) != 0) return;
  if (arch(ARCH_SET_CPUID, 0) != 0) { real_sigaction(SIGSEGV, &app_handler, NULL); return; }
  active = 1;
  setenv("PARED_HIDE_ISA_STATUS", "active", 1);
}

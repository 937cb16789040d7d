/* Can a program on this machine use AMX tiles? Some virtual machines list AMX among the CPU's features but fault
 * on its first tile instruction (SIGILL), and llama.cpp built with -march=native then dies on its first quantized
 * matrix product. Exit 0: usable; anything else (2: the kernel refused the permission; killed by SIGILL): not.
 * Built and run by scripts/setup.sh. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

int main(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        return 2;
    }
    uint8_t config[64];
    memset(config, 0, sizeof config);
    config[0] = 1;   /* palette 1 */
    config[16] = 64; /* tile 0: 64 bytes a row ... */
    config[48] = 16; /* ... and 16 rows */
    _tile_loadconfig(config);
    _tile_zero(0);
    _tile_release();
    return 0;
}

// Test-only: deliberate memory and UB errors that `make sanitize` must see caught, so the instrument can
// never be silently off. Built by .ci/sanitize.sh into build/sanitize/ as a separate tiny library; it is
// never part of the rlhf_kernels extension.
#include <climits>
#include <cstdlib>

extern "C" int read_past_end(int n) {
    volatile int* buf = static_cast<int*>(std::malloc(sizeof(int) * n));
    for (int i = 0; i < n; ++i) buf[i] = i;
    int x = buf[n];  // one element past the allocation: ASan reports heap-buffer-overflow
    std::free(const_cast<int*>(buf));
    return x;
}

extern "C" int overflow_int(int a) {
    volatile int b = INT_MAX;
    return a + b;  // signed overflow for a > 0: UBSan reports and, with -fno-sanitize-recover, aborts
}

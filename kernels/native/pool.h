/* A small pool of worker threads shared by the CPU kernels (asleep between calls). */
#ifndef MOBILEO_POOL_H
#define MOBILEO_POOL_H

typedef void (*mobileo_part_fn)(void *arg, int part, int parts);

/* Threads taking part in a call, the caller included: sets it when threads > 0; the
 * default is the CPUs this process may run on. Returns the current value. */
int mobileo_pool_threads(int threads);

/* Runs fn(arg, i, parts) for i in [0, parts), part 0 on the calling thread, and returns 0
 * when all are done. One call runs at a time: with wait = 0 a call that finds the pool busy
 * returns -1 at once (and runs nothing), otherwise it waits its turn. */
int mobileo_pool_run(mobileo_part_fn fn, void *arg, int parts, int wait);

/* fn(arg, begin, end) over [0, count) in one piece per thread, the pieces cut at multiples of
 * align (so every piece but the last is whole vectors of that many values); the calling thread
 * alone below serial_below values (waking the others would cost more). Waits for the pool. */
typedef void (*mobileo_range_fn)(void *arg, long begin, long end);
void mobileo_pool_run_ranges(mobileo_range_fn fn, void *arg, long count, long align, long serial_below);

#endif

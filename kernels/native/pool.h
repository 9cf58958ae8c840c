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

#endif

/* See pool.h. Workers are created on first use and sleep on a condition variable. */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <unistd.h>

#define MAX_THREADS 64

static pthread_mutex_t running = PTHREAD_MUTEX_INITIALIZER; /* held for a whole call */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t start = PTHREAD_COND_INITIALIZER;
static pthread_cond_t done = PTHREAD_COND_INITIALIZER;
static int threads_wanted = 0;           /* 0: not set yet */
static int started = 0;                  /* worker threads running */
static unsigned long generation = 0;
static int pending = 0;
static mobileo_part_fn job_fn;
static void *job_arg;
static int job_parts = 1;
static unsigned long worker_seen[MAX_THREADS]; /* the generation each worker last ran */

static void *worker(void *arg) {
  const int index = (int)(intptr_t)arg;
  pthread_mutex_lock(&lock);
  unsigned long seen = worker_seen[index]; /* set by its creator, under the lock */
  for (;;) {
    while (generation == seen) pthread_cond_wait(&start, &lock);
    seen = generation;
    const mobileo_part_fn fn = job_fn;
    void *const fn_arg = job_arg;
    const int parts = job_parts;
    pthread_mutex_unlock(&lock);
    if (index < parts) fn(fn_arg, index, parts);
    pthread_mutex_lock(&lock);
    if (--pending == 0) pthread_cond_signal(&done);
  }
  return NULL;
}

static int default_threads(void) {
  int count = 0;
#ifdef CPU_COUNT
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) count = CPU_COUNT(&set);
#endif
  if (count <= 0) count = (int)sysconf(_SC_NPROCESSORS_ONLN);
  if (count <= 0) count = 1;
  return count > MAX_THREADS ? MAX_THREADS : count;
}

/* A forked child has none of the parent's workers: start again from nothing. */
static void reset_after_fork(void) {
  pthread_mutex_init(&running, NULL);
  pthread_mutex_init(&lock, NULL);
  pthread_cond_init(&start, NULL);
  pthread_cond_init(&done, NULL);
  started = 0;
  pending = 0;
}

static void ensure_workers(int threads) {
  static int atfork_registered = 0;
  if (!atfork_registered) {
    pthread_atfork(NULL, NULL, reset_after_fork);
    atfork_registered = 1;
  }
  while (started < threads - 1) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    worker_seen[started + 1] = generation;
    const int failed = pthread_create(&thread, &attr, worker, (void *)(intptr_t)(started + 1));
    pthread_attr_destroy(&attr);
    if (failed) break;
    started++;
  }
}

int mobileo_pool_threads(int threads) {
  if (threads > 0) threads_wanted = threads > MAX_THREADS ? MAX_THREADS : threads;
  if (threads_wanted == 0) threads_wanted = default_threads();
  return threads_wanted;
}

int mobileo_pool_run(mobileo_part_fn fn, void *arg, int parts, int wait) {
  if (wait ? pthread_mutex_lock(&running) != 0 : pthread_mutex_trylock(&running) != 0) return -1;
  if (parts > 1) {
    pthread_mutex_lock(&lock);
    ensure_workers(parts);
    if (parts > started + 1) parts = started + 1;
    if (parts > 1) {
      job_fn = fn;
      job_arg = arg;
      job_parts = parts;
      pending = started;
      generation++;
      pthread_cond_broadcast(&start);
    }
    pthread_mutex_unlock(&lock);
  }
  fn(arg, 0, parts < 1 ? 1 : parts);
  if (parts > 1) {
    pthread_mutex_lock(&lock);
    while (pending > 0) pthread_cond_wait(&done, &lock);
    pthread_mutex_unlock(&lock);
  }
  pthread_mutex_unlock(&running);
  return 0;
}

struct ranges {
  mobileo_range_fn fn;
  void *arg;
  long count, align;
};

static void range_part(void *arg, int part, int parts) {
  const struct ranges *r = arg;
  const long vectors = (r->count + r->align - 1) / r->align;
  const long begin = vectors * part / parts * r->align, end = vectors * (part + 1) / parts * r->align;
  r->fn(r->arg, begin, end < r->count ? end : r->count);
}

void mobileo_pool_run_ranges(mobileo_range_fn fn, void *arg, long count, long align, long serial_below) {
  struct ranges r = {fn, arg, count, align};
  const int parts = count < serial_below ? 1 : mobileo_pool_threads(0);
  if (mobileo_pool_run(range_part, &r, parts, 1) != 0) range_part(&r, 0, 1);
}

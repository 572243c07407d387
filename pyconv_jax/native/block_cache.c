// Keeps large allocations mapped after they are freed, to hand them out again.
//
// XLA:CPU takes an executable's temporary buffer from the C allocator on every call and frees it
// at the end: 1.5 GB for a PyConvResNet-50 train step at batch 16. glibc serves anything above
// its largest mmap threshold (32 MiB) with a fresh mapping and unmaps it when freed, so every
// step faults in and zeroes its whole working memory again; in a VM that reports freed pages to
// its host, those faults also go to the host (the train step: 2.39 s without this, 1.75 s with).
// This library, loaded with LD_PRELOAD (pyconv_jax/host.py), serves allocations of at least
// PYCONV_BLOCK_CACHE_MIN bytes (default 32 MiB) from its own mappings and keeps them on free for
// the next allocation of about the same size. Everything smaller goes to glibc unchanged.
//
// A freed block is reused for a request of at least 4/5 of its size (best fit); blocks that have
// not been reused are unmapped, oldest first, once the free ones exceed
// PYCONV_BLOCK_CACHE_MAX_FREE bytes (default: a quarter of physical memory). Blocks are mapped in
// whole 2 MiB pages and asked for transparent huge pages.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

// glibc's own entry points, so that this file never calls back into itself.
extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

enum { kMaxBlocks = 256 };
static const size_t kPage = 4096;
static const size_t kHugePage = 2u << 20;

typedef struct {
  void *address;
  size_t size;     // mapped bytes
  int in_use;
  uint64_t freed;  // when it was last freed, by a counter
} Block;

static Block blocks[kMaxBlocks];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static size_t min_size = 32u << 20;
static size_t max_free = 0;
static size_t free_bytes = 0;
static uint64_t clock_ticks = 0;
static uint64_t stats_reused = 0, stats_mapped = 0, stats_unmapped = 0;

static size_t parse_size(const char *text, size_t fallback) {
  if (text == NULL || *text == '\0') return fallback;
  char *end = NULL;
  unsigned long long value = strtoull(text, &end, 10);
  return (end != NULL && *end == '\0') ? (size_t)value : fallback;
}

// fork() while another thread holds the lock would leave the child's copy locked for good.
static void lock_before_fork(void) { pthread_mutex_lock(&lock); }
static void unlock_after_fork(void) { pthread_mutex_unlock(&lock); }

// Reads the settings when the library loads, before the program's first allocation.
__attribute__((constructor)) static void configure(void) {
  pthread_atfork(lock_before_fork, unlock_after_fork, unlock_after_fork);
  min_size = parse_size(getenv("PYCONV_BLOCK_CACHE_MIN"), min_size);
  long pages = sysconf(_SC_PHYS_PAGES);
  size_t quarter = pages > 0 ? (size_t)pages * kPage / 4 : (size_t)4 << 30;
  max_free = parse_size(getenv("PYCONV_BLOCK_CACHE_MAX_FREE"), quarter);
}

static int is_large(size_t size) { return size >= min_size; }

// Unmaps free blocks, oldest first, until the free ones fit in max_free (lock held).
static void trim(size_t limit) {
  while (free_bytes > limit) {
    int oldest = -1;
    for (int i = 0; i < kMaxBlocks; ++i)
      if (blocks[i].address && !blocks[i].in_use &&
          (oldest < 0 || blocks[i].freed < blocks[oldest].freed))
        oldest = i;
    if (oldest < 0) return;
    munmap(blocks[oldest].address, blocks[oldest].size);
    free_bytes -= blocks[oldest].size;
    blocks[oldest].address = NULL;
    ++stats_unmapped;
  }
}

static void *allocate(size_t size) {
  size_t rounded = (size + kHugePage - 1) & ~(kHugePage - 1);
  pthread_mutex_lock(&lock);
  int best = -1;
  for (int i = 0; i < kMaxBlocks; ++i) {
    const Block *b = &blocks[i];
    if (b->address && !b->in_use && b->size >= rounded && size >= b->size / 5 * 4 &&
        (best < 0 || b->size < blocks[best].size))
      best = i;
  }
  if (best >= 0) {
    blocks[best].in_use = 1;
    free_bytes -= blocks[best].size;
    ++stats_reused;
    pthread_mutex_unlock(&lock);
    return blocks[best].address;
  }
  int slot = -1;
  for (int i = 0; i < kMaxBlocks && slot < 0; ++i)
    if (!blocks[i].address) slot = i;
  if (slot < 0) {  // every slot holds a block: make room by unmapping a free one
    trim(0);
    for (int i = 0; i < kMaxBlocks && slot < 0; ++i)
      if (!blocks[i].address) slot = i;
  }
  pthread_mutex_unlock(&lock);
  if (slot < 0) return NULL;  // kMaxBlocks large blocks in use at once: let glibc serve it
  void *address = mmap(NULL, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (address == MAP_FAILED) return NULL;
  // Transparent huge pages where the kernel offers them on request: 512 times fewer first faults.
  madvise(address, rounded, MADV_HUGEPAGE);
  pthread_mutex_lock(&lock);
  slot = -1;  // look again: another thread may have taken it meanwhile
  for (int i = 0; i < kMaxBlocks && slot < 0; ++i)
    if (!blocks[i].address) slot = i;
  if (slot >= 0) {
    blocks[slot] = (Block){address, rounded, 1, 0};
    ++stats_mapped;
  }
  pthread_mutex_unlock(&lock);
  if (slot < 0) {
    munmap(address, rounded);
    return NULL;
  }
  return address;
}

// The block that starts at `address`, or -1 (lock held).
static int find(const void *address) {
  if (address == NULL || ((uintptr_t)address & (kPage - 1)) != 0) return -1;
  for (int i = 0; i < kMaxBlocks; ++i)
    if (blocks[i].address == address) return i;
  return -1;
}

// Returns 1 when `address` was one of ours (now free), 0 when it belongs to glibc.
static int release(void *address) {
  if (address == NULL || ((uintptr_t)address & (kPage - 1)) != 0) return 0;
  pthread_mutex_lock(&lock);
  int i = find(address);
  if (i >= 0) {
    blocks[i].in_use = 0;
    blocks[i].freed = ++clock_ticks;
    free_bytes += blocks[i].size;
    trim(max_free);
  }
  pthread_mutex_unlock(&lock);
  return i >= 0;
}

static size_t block_size(const void *address) {
  pthread_mutex_lock(&lock);
  int i = find(address);
  size_t size = i >= 0 ? blocks[i].size : 0;
  pthread_mutex_unlock(&lock);
  return size;
}

void *malloc(size_t size) {
  if (is_large(size)) {
    void *address = allocate(size);
    if (address) return address;
  }
  return __libc_malloc(size);
}

void free(void *address) {
  if (!release(address)) __libc_free(address);
}

size_t malloc_usable_size(void *address) {
  size_t size = block_size(address);
  if (size != 0) return size;
  static size_t (*glibc_usable_size)(void *);
  if (glibc_usable_size == NULL) glibc_usable_size = dlsym(RTLD_NEXT, "malloc_usable_size");
  return glibc_usable_size ? glibc_usable_size(address) : 0;
}

void *realloc(void *address, size_t size) {
  size_t old = block_size(address);
  if (old == 0 && !is_large(size)) return __libc_realloc(address, size);
  if (old != 0 && size <= old && size >= old / 5 * 4) return address;
  void *moved = malloc(size);
  if (moved == NULL) return NULL;
  if (address != NULL) {
    size_t keep = old != 0 ? old : malloc_usable_size(address);
    memcpy(moved, address, keep < size ? keep : size);
    free(address);
  }
  return moved;
}

static void *aligned(size_t alignment, size_t size) {
  if (alignment <= kPage && is_large(size)) {
    void *address = allocate(size);
    if (address) return address;
  }
  return __libc_memalign(alignment, size);
}

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0) return EINVAL;
  void *address = aligned(alignment, size);
  if (address == NULL) return ENOMEM;
  *out = address;
  return 0;
}

void *aligned_alloc(size_t alignment, size_t size) { return aligned(alignment, size); }
void *memalign(size_t alignment, size_t size) { return aligned(alignment, size); }

// For tests: how many large allocations reused a block, mapped a new one, and blocks unmapped.
void PyconvBlockCacheStats(uint64_t out[3]) {
  pthread_mutex_lock(&lock);
  out[0] = stats_reused;
  out[1] = stats_mapped;
  out[2] = stats_unmapped;
  pthread_mutex_unlock(&lock);
}

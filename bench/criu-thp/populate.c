#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(int c, char **v){
  size_t n = (size_t)atoi(v[1]) << 20; int hg = atoi(v[2]);
  /* 2 MiB-aligned so huge pages can cover the whole range */
  char *p = mmap(NULL, n + (2<<20), PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
  p = (char *)(((unsigned long)p + (2<<20) - 1) & ~((2UL<<20) - 1));
  if (hg) madvise(p, n, MADV_HUGEPAGE);
  double t = now(); memset(p, 1, n); t = now() - t;
  printf("%s %.1f ms %.2f GiB/s\n", hg ? "huge" : "4k", t*1e3, n/t/(1<<30));
  return 0;
}

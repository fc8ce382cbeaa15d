/* fleet.c - the state every replica shares (fleet.h). */
#include "fleet.h"

struct bw_sup bw_sup;

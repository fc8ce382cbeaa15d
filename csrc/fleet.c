/* fleet.c - the state every replica shares (fleet.h). */
#include "fleet.h"

#include "mp.h"

struct bw_sup bw_sup;

const msgpack_object *bw_fleet_config(msgpack_zone *z) {
    msgpack_object *cfg = msgpack_zone_malloc(z, sizeof *cfg);
    if (!cfg || !bw_sup.config || bw_mp_unpack_exact(bw_sup.config, bw_sup.config_len, z, cfg) < 0)
        return NULL;
    return cfg;
}

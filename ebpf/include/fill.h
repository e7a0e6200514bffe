/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * How full the tables the programs insert into are (`map_fill`), and the inserts that found one
 * full (the per-CPU `map_full`), so that a node says when a table fills instead of silently
 * losing state. The loader sizes the tables and writes their capacity into `map_fill`.
 */
#ifndef SLIPWAY_FILL_H
#define SLIPWAY_FILL_H

#include <linux/bpf.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLIPWAY_MAP_MAX);
	__type(key, __u32);
	__type(value, struct map_fill);
} map_fill SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SLIPWAY_MAP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} map_full SEC(".maps");

/* Not inlined: as a subprogram its signature, and with it enum slipway_map, is in the object's
 * BTF, where userspace checks the enum's values against its mirror. */
static __noinline void fill_full(enum slipway_map table)
{
	__u32 key = table;
	__u64 *value = bpf_map_lookup_elem(&map_full, &key);

	/* Per-CPU value: no other CPU writes it, a plain add is enough. */
	if (value)
		*value += 1;
}

/* Inserts `value` at `key` in `map` (table `table`), counting a new entry in `map_fill`, or, when
 * the table holds its capacity or refuses the insert, in `map_full`. Returns what the update
 * helper returned. */
static __always_inline long fill_update(void *map, enum slipway_map table, const void *key,
					const void *value)
{
	__u32 index = table;
	struct map_fill *fill = bpf_map_lookup_elem(&map_fill, &index);
	long err = bpf_map_update_elem(map, key, value, BPF_NOEXIST);

	if (err == -EEXIST)
		return bpf_map_update_elem(map, key, value, BPF_ANY);
	if (err) {
		fill_full(table);
		return err;
	}
	if (!fill || !fill->capacity)
		return 0;
	/* Racy between CPUs by an entry or two, never by more: good enough for a gauge. */
	if (*(volatile __s64 *)&fill->entries >= fill->capacity)
		fill_full(table);
	else
		__sync_fetch_and_add(&fill->entries, 1);
	return 0;
}

/* Deletes `key` from `map` (table `table`), uncounting it if it was there. */
static __always_inline long fill_delete(void *map, enum slipway_map table, const void *key)
{
	__u32 index = table;
	long err = bpf_map_delete_elem(map, key);
	struct map_fill *fill = bpf_map_lookup_elem(&map_fill, &index);

	if (!err && fill && fill->capacity && *(volatile __s64 *)&fill->entries > 0)
		__sync_fetch_and_add(&fill->entries, -1);
	return err;
}

#endif /* SLIPWAY_FILL_H */

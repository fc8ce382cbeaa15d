/* image_archive.h - one checkpoint image as a zstd-compressed tar (libarchive), to carry it
 * between machines by hand: `beam checkpoints export` / `import` run these through
 * beam-worker --export-checkpoint / --import-checkpoint.
 *
 * The archive holds <key>/restore.msgpack, <key>/manifest.json and the files of <key>/img,
 * nothing else: an import refuses any other path, any non-regular file, and any image whose
 * sizes and XXH3 hashes (restore.msgpack) do not match, leaving nothing behind. */
#ifndef BW_IMAGE_ARCHIVE_H
#define BW_IMAGE_ARCHIVE_H

/* Write the image key of the checkpoint root to file (atomically). 0, or -1 (said why). */
int bw_archive_export(const char *root, const char *key, const char *file);
/* Verify the archive file and rename its image into the root. 0, or -1 (said why). */
int bw_archive_import(const char *root, const char *file);

#endif

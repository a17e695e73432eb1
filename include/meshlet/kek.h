/*
 * kek: the key encryption key that protects secrets control keeps in a
 * shared store (the CA private keys in etcd): 32 random bytes in a file
 * only its owner may read (--kek-file; `meshlet-control init-kek FILE`
 * makes one), and AES-256-GCM sealing under it.
 *
 * A sealed value is text: "aes-256-gcm:" then the hex of a fresh 12-byte
 * nonce, the ciphertext and the 16-byte tag. The additional data names
 * what is sealed (e.g. "meshlet ca-key td=mesh.local id=0"), so a sealed
 * value moved to another record or trust domain does not open.
 */
#ifndef MESHLET_KEK_H
#define MESHLET_KEK_H

#include <stddef.h>

#include "meshlet/json.h"

#define KEK_LEN 32

/* Creates path (must not exist, never through a symlink) holding 32 random
 * bytes, mode 0600, fsync'd. 0 or a negative errno with a message in err. */
int kek_create(const char *path, struct meshlet_err *err);

/* Reads the KEK of path into key: a regular file (no symlink) of exactly
 * KEK_LEN bytes that group and others may not access. 0, or -EACCES /
 * -EINVAL / -errno with a message in err saying what is wrong. */
int kek_load(const char *path, unsigned char key[KEK_LEN], struct meshlet_err *err);

/* Seals n bytes of plain under key, bound to aad. A new string (free()),
 * or NULL (out of memory, no randomness). */
char *kek_seal(const unsigned char key[KEK_LEN], const char *aad, const void *plain, size_t n);

/* Opens a sealed value: 0 and *plain (malloc'd, NUL after *n bytes; cleanse
 * and free it); -EINVAL not a sealed value; -EBADMSG the tag does not
 * verify (another KEK, another aad, or tampered); -ENOMEM. */
int kek_open(const unsigned char key[KEK_LEN], const char *aad, const char *sealed, char **plain,
             size_t *n);

#endif

/* kek: the key encryption key and AES-256-GCM sealing; see kek.h. */
#include "meshlet/kek.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "meshlet/file.h"

#define SEAL_TAG "aes-256-gcm:"
#define NONCE_LEN 12
#define GCM_TAG_LEN 16

int kek_create(const char *path, struct meshlet_err *err)
{
	unsigned char key[KEK_LEN];
	int r;

	if (RAND_priv_bytes(key, sizeof(key)) != 1)
		return err_set(err, "", "no randomness for the KEK");
	r = file_write_new(path, 0600, key, sizeof(key));
	OPENSSL_cleanse(key, sizeof(key));
	if (r)
		err_set(err, "", "cannot create %s: %s%s", path, strerror(-r),
		        r == -EEXIST ? " (a KEK is never overwritten: every replica and the "
		        "store depend on it)" : "");
	return r;
}

int kek_load(const char *path, unsigned char key[KEK_LEN], struct meshlet_err *err)
{
	char *data = NULL;
	size_t len = 0;
	struct stat st;
	int r = file_read(path, KEK_LEN + 1, FILE_NOFOLLOW | FILE_SECRET, &data, &len);

	if (r == -EACCES && lstat(path, &st) == 0 && (st.st_mode & 077))
		err_set(err, "", "--kek-file %s: mode %04o lets group or others read the key "
		        "encryption key: chmod 600 %s", path, (unsigned)(st.st_mode & 07777), path);
	else if (r == -EFBIG || (!r && len != KEK_LEN))
		r = err_set(err, "", "--kek-file %s: expected exactly %d bytes (make one with "
		            "meshlet-control init-kek FILE)", path, KEK_LEN);
	else if (r == -ELOOP)
		err_set(err, "", "--kek-file %s: a symlink (refused)", path);
	else if (r == -EINVAL)
		err_set(err, "", "--kek-file %s: not a regular file", path);
	else if (r)
		err_set(err, "", "--kek-file %s: %s", path, strerror(-r));
	if (!r)
		memcpy(key, data, KEK_LEN);
	if (data)
		OPENSSL_cleanse(data, len);
	free(data);
	return r;
}

static void to_hex(const unsigned char *p, size_t n, char *out)
{
	for (size_t i = 0; i < n; i++)
		snprintf(out + 2 * i, 3, "%02x", p[i]);
}

static int from_hex(const char *s, size_t n, unsigned char *out)
{
	for (size_t i = 0; i < n; i++) {
		unsigned v;

		if (sscanf(s + 2 * i, "%2x", &v) != 1 || !strchr("0123456789abcdef", s[2 * i]) ||
		    !strchr("0123456789abcdef", s[2 * i + 1]))
			return -EINVAL;
		out[i] = (unsigned char)v;
	}
	return 0;
}

/* One AES-256-GCM pass: encrypt (tag out) or decrypt (tag in, checked). */
static int gcm(bool enc, const unsigned char key[KEK_LEN], const unsigned char *nonce,
               const char *aad, const unsigned char *in, size_t n, unsigned char *out,
               unsigned char *tag)
{
	EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
	int len = 0, ok;

	ok = c && EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, key, nonce, enc ? 1 : 0) == 1 &&
	     EVP_CipherUpdate(c, NULL, &len, (const unsigned char *)aad, (int)strlen(aad)) == 1 &&
	     EVP_CipherUpdate(c, out, &len, in, (int)n) == 1 &&
	     (enc || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, GCM_TAG_LEN, tag) == 1) &&
	     EVP_CipherFinal_ex(c, out + len, &len) == 1 &&
	     (!enc || EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, GCM_TAG_LEN, tag) == 1);
	EVP_CIPHER_CTX_free(c);
	return ok ? 0 : -EBADMSG;
}

char *kek_seal(const unsigned char key[KEK_LEN], const char *aad, const void *plain, size_t n)
{
	size_t raw_len = NONCE_LEN + n + GCM_TAG_LEN;
	unsigned char *raw = malloc(raw_len);
	char *out = malloc(strlen(SEAL_TAG) + 2 * raw_len + 1);

	if (!raw || !out || n > 1024 * 1024 || RAND_bytes(raw, NONCE_LEN) != 1 ||
	    gcm(true, key, raw, aad, plain, n, raw + NONCE_LEN, raw + NONCE_LEN + n) < 0) {
		free(raw);
		free(out);
		return NULL;
	}
	strcpy(out, SEAL_TAG);
	to_hex(raw, raw_len, out + strlen(SEAL_TAG));
	free(raw);
	return out;
}

int kek_open(const unsigned char key[KEK_LEN], const char *aad, const char *sealed, char **plain,
             size_t *n)
{
	size_t hex_len, raw_len, len;
	unsigned char *raw;
	int r;

	*plain = NULL;
	*n = 0;
	if (!sealed || strncmp(sealed, SEAL_TAG, strlen(SEAL_TAG)) != 0)
		return -EINVAL;
	sealed += strlen(SEAL_TAG);
	hex_len = strlen(sealed);
	if (hex_len % 2 || hex_len / 2 < NONCE_LEN + GCM_TAG_LEN)
		return -EINVAL;
	raw_len = hex_len / 2;
	len = raw_len - NONCE_LEN - GCM_TAG_LEN;
	raw = malloc(raw_len);
	*plain = malloc(len + 1);
	if (!raw || !*plain) {
		r = -ENOMEM;
		goto out;
	}
	r = from_hex(sealed, raw_len, raw);
	if (!r)
		r = gcm(false, key, raw, aad, raw + NONCE_LEN, len, (unsigned char *)*plain,
		        raw + NONCE_LEN + len);
	if (!r) {
		(*plain)[len] = '\0';
		*n = len;
	}
out:
	free(raw);
	if (r && *plain) {
		OPENSSL_cleanse(*plain, len);
		free(*plain);
		*plain = NULL;
	}
	return r;
}

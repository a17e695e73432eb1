/*
 * conn_tdest: where a transparent connection was going. iptables
 * redirected the app's connection to our listener; the kernel still knows
 * the original destination, which names a service of the mesh (through
 * control's registry) or lies outside it.
 */
#include "conn-int.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>

#include "meshlet/log.h"

#ifndef SO_ORIGINAL_DST
#define SO_ORIGINAL_DST 80          /* linux/netfilter_ipv4.h; same value for IPv6 */
#endif

/* An IPv4 connection on a dual-stack [::] socket has a v4-mapped address;
 * its conntrack entry, and so its original destination, is IPv4. */
static void unmap_v4(struct sockaddr_storage *ss, socklen_t *len)
{
	const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)ss;
	struct sockaddr_in a4 = {.sin_family = AF_INET};

	if (ss->ss_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&a6->sin6_addr))
		return;
	a4.sin_port = a6->sin6_port;
	memcpy(&a4.sin_addr, &a6->sin6_addr.s6_addr[12], 4);
	memset(ss, 0, sizeof(*ss));
	memcpy(ss, &a4, sizeof(a4));
	*len = sizeof(a4);
}

/* Where the app was connecting before iptables redirected it to us
 * (IPv4: SO_ORIGINAL_DST at SOL_IP; IPv6: IP6T_SO_ORIGINAL_DST at SOL_IPV6). */
static int original_destination(int fd, struct sockaddr_storage *dst, socklen_t *len)
{
	struct sockaddr_storage self;
	socklen_t slen = sizeof(self);

	*len = sizeof(*dst);
	if (getsockname(fd, (struct sockaddr *)&self, &slen) < 0)
		return -errno;
	unmap_v4(&self, &slen);
	if (getsockopt(fd, self.ss_family == AF_INET6 ? SOL_IPV6 : SOL_IP, SO_ORIGINAL_DST, dst,
	               len) < 0)
		return -errno;
	/* Not redirected (someone dialled the listener itself): no destination. */
	if (*len == slen && memcmp(dst, &self, slen) == 0)
		return -ELOOP;
	return 0;
}

/*
 * Transparent: the original destination (IP and port) names a service
 * through control's registry; we then connect to that instance's inbound
 * listener and expect its SPIFFE ID. Anything else is outside the mesh:
 * refused, or relayed as plain TCP when the config says passthrough.
 */
void conn_transparent_start(struct conn *c, int fd)
{
	const char *svc;
	const struct config_addr *inbound = NULL;
	struct sockaddr_storage dst;
	socklen_t len;
	bool ambiguous = false;
	int rc = original_destination(fd, &dst, &len);

	if (rc < 0) {
		log_warn("conn %llu: transparent: no original destination: %s",
		         (unsigned long long)c->id, strerror(-rc));
		conn_close(c, CR_UPSTREAM_REFUSED);
		return;
	}
	c->tdest = calloc(1, sizeof(*c->tdest));
	if (!c->tdest) {
		conn_close(c, CR_INTERNAL);
		return;
	}
	svc = snapshot_lookup_dest(c->snap, &dst, &inbound, &ambiguous);
	if (svc) {
		c->tdest->addr = *inbound;
		identity_format(c->tdest->expect_id, sizeof(c->tdest->expect_id),
		                conn_cfg(c)->trust_domain, svc);
	} else {
		memcpy(&c->tdest->addr.ss, &dst, len);
		c->tdest->addr.len = len;
		conn_addr_text(&dst, c->tdest->addr.text, sizeof(c->tdest->addr.text));
		/* Claimed by two services: a mesh destination we cannot name, so
		 * never sent in plaintext either. */
		if (ambiguous) {
			log_warn("conn %llu: registry entries of several services hold %s: refused",
			         (unsigned long long)c->id, c->tdest->addr.text);
			conn_close(c, CR_OUTSIDE_MESH);
			return;
		}
		if (!conn_cfg(c)->outside_mesh_passthrough) {
			log_info("conn %llu: %s is outside the mesh: refused", (unsigned long long)c->id,
			         c->tdest->addr.text);
			conn_close(c, CR_OUTSIDE_MESH);
			return;
		}
	}
	conn_connect_next(c);
}

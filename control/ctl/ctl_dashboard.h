/*
 * ctl_dashboard.h: the dashboard's files, built into meshletctl. They live
 * in control/ctl/dashboard/ and meson turns them into C arrays at build
 * time (dashboard/embed.py): edit the files, rebuild, nothing else.
 */
#ifndef MESHLET_CTL_DASHBOARD_H
#define MESHLET_CTL_DASHBOARD_H

#include <stddef.h>

struct dash_asset {
	const char *path;          /* "/", "/app.js", ... */
	const char *content_type;
	const unsigned char *data;
	size_t len;
};

/* Ended by an entry with a NULL path. */
extern const struct dash_asset dash_assets[];

#endif

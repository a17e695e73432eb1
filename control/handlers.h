/*
 * handlers: the API's route table and one handler per route. Each parses
 * its request with lib/api.c, calls state.c, and wakes the long polls
 * (watch.c) after a change that moves some service's config version.
 */
#ifndef MESHLET_CONTROL_HANDLERS_H
#define MESHLET_CONTROL_HANDLERS_H

#include <stdbool.h>

#include "server.h"

/* The routes, ended by an entry with a NULL method. */
extern const struct route handlers_routes[];

/* The HTTP status of a state error (the -errno table in state.h): 400,
 * 403, 404, 409, 412, 413, 429, or 500 for anything else. */
int handlers_status(int state_err);

/* A long poll ends: answer it with the current config, or (aborted) drop
 * it. The watch_done_fn of control's watch. */
void handlers_config_done(struct api_call *call, bool aborted);

#endif

/*
 * meshletctl: the operator CLI of meshlet-control, a thin client of its
 * HTTPS JSON API (docs/design.md, "meshletctl"). The parts are described in
 * ctl.h: commands are rows of one table, main() parses the command line,
 * runs the command's handler and makes sure its output was written.
 */
#include "ctl.h"

#include <errno.h>
#include <signal.h>
#include <string.h>

int main(int argc, char **argv)
{
	struct ctl ctl = { .prog = "meshletctl", .output = OUT_TABLE };
	const struct ctl_cmd *cmd = NULL;
	struct ctl_args a = { 0 };
	int rc;

	signal(SIGPIPE, SIG_IGN);
	rc = ctl_parse_args(&ctl, argc, argv, &cmd, &a);
	if (rc != CTL_RUN)
		return rc;
	rc = cmd->run(&ctl, cmd, &a);
	httpc_free(ctl.http);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		fprintf(stderr, "meshletctl: cannot write the output: %s\n", strerror(errno));
		return rc ? rc : EXIT_USAGE;
	}
	return rc;
}

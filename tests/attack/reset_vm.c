/* A guest that ends its VM under the running containers: from a privileged
 * container (CAP_SYS_RAWIO), pulse the reset line of the i8042 keyboard
 * controller, as Linux's reboot=k does. The VM resets at once, with no
 * shutdown of the guest: the host must report every task exited and leave
 * nothing behind. */
#include <stdio.h>
#include <sys/io.h>

int main(void)
{
	if (iopl(3) != 0) {
		perror("iopl");
		return 1;
	}
	puts("pulsing the i8042 reset line");
	fflush(stdout);
	outb(0xfe, 0x64);
	/* The VM is gone before this runs. */
	puts("still running: no reset");
	return 2;
}

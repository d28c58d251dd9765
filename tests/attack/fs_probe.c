/* Run as root in the guest on the virtio-fs share: tries to set host
 * security.* and trusted.* extended attributes, to read the host's, and to
 * create a block device node. Prints one line per attempt (tests/
 * host_confinement.rs checks the host side). */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>

static void set(const char *path, const char *name, const void *value, size_t size)
{
    int rc = setxattr(path, name, value, size, 0);
    printf("probe: set %s: %s\n", name, rc == 0 ? "ok" : strerror(errno));
}

static void get(const char *path, const char *name)
{
    char value[256];
    ssize_t size = getxattr(path, name, value, sizeof value - 1);
    if (size < 0) {
        printf("probe: get %s: %s\n", name, strerror(errno));
        return;
    }
    value[size] = 0;
    printf("probe: get %s: %s\n", name, value);
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s GUEST-FILE HOST-FILE DEVICE-NODE\n", argv[0]);
        return 2;
    }
    /* struct vfs_cap_data, revision 2, effective: CAP_SYS_ADMIN. */
    unsigned int cap[5] = { 0x02000001, 1u << 21, 0, 0, 0 };
    set(argv[1], "security.capability", cap, sizeof cap);
    set(argv[1], "trusted.guest", "t", 1);
    set(argv[1], "user.guest", "u", 1);
    get(argv[1], "user.guest");
    get(argv[2], "trusted.host");
    get(argv[2], "user.host");
    int rc = mknod(argv[3], S_IFBLK | 0600, makedev(8, 0));
    printf("probe: mknod: %s\n", rc == 0 ? "ok" : strerror(errno));
    return 0;
}

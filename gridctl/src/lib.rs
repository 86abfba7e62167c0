//! gridctl: a reference grid controller that speaks the AppLogic command dialect behind OpenSSH.
//!
//! A **grid** is a state directory, a supervising daemon (`gridctl daemon --state STATE`) that owns
//! the applications' processes, and the forced command of the grid's `sshd`
//! (`gridctl ssh --state STATE`) that turns `SSH_ORIGINAL_COMMAND` into a request to the daemon.
//! Applications therefore outlive the SSH session that started them.
//!
//! # Commands (`gridctl --help`)
//!
//! ```text
//! gridctl daemon --state STATE              the supervisor; listens on STATE/daemon.sock
//! gridctl ssh --state STATE                 sshd's ForceCommand; reads SSH_ORIGINAL_COMMAND
//! gridctl kvstore --listen IP:PORT --data FILE   the built-in `kvstore` component
//! gridctl lab up --grids N --dir DIR [--base B] [--mig-bin PATH] [--netns]
//! gridctl lab down --dir DIR
//! ```
//!
//! `gridctl ssh` exits 0 when the operation succeeded, 1 when it failed (stderr names the
//! application and the reason), 2 when the command was refused (not in the dialect, a bad name
//! or value, an interactive login). Every line MIG sends is parsed with
//! [`dialect::Command::parse`]; nothing else runs.
//!
//! # Verbs, as gridctl implements them
//!
//! * `provision TEMPLATE NAME [p=v…]`: creates the volumes, then starts; it answers once every
//!   component is ready (or exits 1 leaving NAME `failed`, e.g. a readiness timeout).
//! * `start` on a running application and `stop` on a stopped one succeed and change nothing.
//!   `stop` of a `failed` application makes it `stopped`.
//! * `destroy` and `config` need `stopped` or `failed`; otherwise exit 1 ("stop it first").
//! * `config`, `provision` and `migrate` refuse a property the application does not declare,
//!   except `mig_op=<32 lowercase hex digits>`, which every application accepts and keeps: the id of the
//!   MIG operation that created it, so that MIG destroys only what its own operation created.
//! * `migrate REMOTE APP .name=NEW --import …` (run on the target) needs REMOTE's host key in
//!   `STATE/peer/known_hosts`, NEW free here, APP `stopped` there; APP is held (no start, no
//!   destroy) while it is copied; NEW ends `stopped`, its properties overridden by `p=v…`.
//!   This grid needs APP's template: NEW runs that local template's components (never the
//!   source's), takes its `required` and `secret`, and keeps the source's values of the
//!   properties it declares (others, and the source's `mig_op`, are dropped). The source's
//!   record must list exactly the volumes its stream carries, with plain names; received files
//!   lose setuid and setgid; the header line is at most 4 MiB.
//!   Without `--import` the command is refused (exit 2): grids only pull.
//!   `--max_rate=BYTES` (a whole number of bytes per second, more than 0) limits the pull: the
//!   stream from the source grid is read no faster than that on average ([`throttle`]).
//! * `peer export APP [--nocompress] [--novols]` is the source side of a pull, for other grids'
//!   keys only (sshd's `ExposeAuthInfo` tells `gridctl ssh` which key logged in).

//! * `migrate … --import --stage` pulls a **staged copy** of APP, which may run meanwhile: NEW is
//!   listed `stopped`, `info --batch` ends with `staged\ttrue`, and `start` refuses it. Then
//!   `migrate … --import --delta` (APP stopped) pulls only the 1 MiB blocks that changed since
//!   into it, and every dir volume; NEW becomes an ordinary stopped application. See [`stage`].
//! * `peer export APP [--nocompress] [--novols | --stage | --delta]` is the source side of a pull,
//!   for other grids' keys only (sshd's `ExposeAuthInfo` tells `gridctl ssh` which key logged in).
//! * `migrate REMOTE APP .name=NEW --import --check` (MIG's dry run) tests the pull's own trust
//!   without copying: REMOTE's host key is pinned here, NEW is free here, and REMOTE takes this
//!   grid's key and answers `peer check APP` (APP's state and volume bytes, nothing held or sent).
//!   Prints `app_state\tSTATE` and `app_bytes\tN`; exit 1 with the reason otherwise.
//! * `grid [--batch]` (MIG's dry run): `free_bytes\tN` (free bytes of the state directory's file
//!   system), one `template\tNAME` per template, one `address\tIP` per IP address an
//!   application's properties hold.
//!
//! # Batch formats (`--batch`; stable, tab-separated, one record per line, no header)
//!
//! * `app list --batch`: `NAME\tSTATE\tTEMPLATE`, sorted by name.
//! * `app info NAME --batch`: `KEY\tVALUE` lines, in this order:
//!   `name`, `state` (`stopped|starting|running|stopping|failed`), `template`,
//!   `error` (the last failure, empty when none), then `prop.PROP\tVALUE` for every property
//!   (sorted; a secret property's VALUE is `***`), then `volume.VOL\tSIZE_BYTES` and
//!   `volume.VOL.kind\tfile|dir` for every volume.
//! * `app checksum NAME`: `VOLUME\tSIZE\tblake3:HEX` per volume. For a `file` volume SIZE is its
//!   logical size and the digest covers its logical content (holes read as zeros); for a `dir`
//!   volume SIZE is the sum of its regular files' sizes and the digest covers a canonical walk
//!   (see [`volume::dir_digest`]).
//! * `app migrate … --progress_on_stdout`: `progress BYTES_DONE BYTES_TOTAL` lines, at most every
//!   250 ms and a final one; BYTES count the data that moves (holes excluded).
//!
//! # State directory layout
//!
//! ```text
//! STATE/grid.toml                 optional: [vars] usable in templates as ${NAME} (lab, grid, mig_bin);
//!                                 [vm] the libvirt settings of VM components (see [`vm`])
//! STATE/templates/NAME.toml       one template per file (format below)
//! STATE/apps/NAME/app.json        the descriptor and state, written atomically (tmp, fsync, rename),
//!                                 created 0600 (it holds the secret properties)
//! STATE/apps/NAME/vols/VOL        a volume: a sparse file (kind file) or a directory (kind dir)
//! STATE/apps/NAME/log             the components' stdout and stderr
//! STATE/apps/NAME/vm-COMP.xml     a VM component's libvirt domain XML, as last defined
//! STATE/apps/NAME/console-COMP.log  a VM component's serial console
//! STATE/daemon.sock               the daemon's Unix socket (JSON lines, see [`protocol`])
//! STATE/peer/id_ed25519           this grid's client key for pulling from other grids
//! STATE/peer/known_hosts          the other grids' pinned host keys; a REMOTE must be listed here
//! STATE/peer/peer_keys            public keys of the grids allowed to use the `peer` verbs
//! STATE/faults/corrupt-export-after   test hook: flip one bit of the next export after N bytes
//! STATE/faults/hold-export        test hook: exports wait, before sending, while this file exists
//! STATE/faults/hold-start-answer  test hook: an `app start` that succeeded holds its answer while this file exists
//! STATE/faults/no-staging         test hook: `peer export` refuses --stage/--delta (an old gridctl)
//! STATE/apps/NAME/stage/VOL       a staged copy's block digests (BLAKE3 of each 1 MiB block)
//! ```
//!
//! # Template format (`STATE/templates/NAME.toml`)
//!
//! ```toml
//! description = "what it is"
//! required = ["in_ip"]               # properties that must be non-empty at provision
//! secret = ["token"]                 # properties `app info` shows as `***` (no log or error shows them)
//! [properties]                       # every property the application accepts, with its default
//! in_ip = ""
//! token = ""
//! port = "8000"
//! data_size = "64M"
//! [[volumes]]
//! name = "data"                      # file volume: a sparse file of `size` bytes (K/M/G/T suffixes)
//! size = "${data_size}"
//! [[volumes]]
//! name = "config"
//! kind = "dir"                       # dir volume: a directory, copied from `init_from` if given
//! init_from = "${lab}/mig"
//! [[components]]
//! name = "main"
//! command = ["${gridctl}", "kvstore", "--listen", "${in_ip}:${port}", "--data", "${vol:data}"]
//! env = { EXAMPLE = "${app}" }
//! ready = "${in_ip}:${port}"         # must accept TCP before the app is `running`
//! ready_timeout_secs = 30
//! restart = "never"                  # or "on-failure": started again when it exits while running
//! restart_delay_ms = 1000            # before the first restart; doubles with each, up to 30 s
//! ```
//!
//! A component may instead be a libvirt virtual machine (see [`vm`]):
//!
//! ```toml
//! [[components]]
//! name = "web"
//! kind = "vm"                        # default "process"; a vm has no command or env
//! ready = "${web_ip}:8000"           # as for a process (passt accepts before the guest answers)
//! stop_timeout_secs = 30             # the ACPI wait before the VM is forced off
//! [components.vm]
//! memory = "128M"                    # at least 16M; substituted
//! vcpus = 1
//! kernel = "${vmapp_dir}/vmlinuz"    # boot a kernel (absolute path after substitution)…
//! initrd = "${vmapp_dir}/initrd.img"
//! cmdline = "console=ttyS0"
//! # image = "${vol:root}"            # …or a disk image (attached first), image_format = "raw"|"qcow2"
//! disks = ["data"]                   # file volumes, attached in order as raw virtio disks
//! ports = [{ host = "${web_ip}:8000", guest = 80 }]   # forwarded by passt (user networking)
//! ```
//!
//! The domain is `<domain type='qemu'>` unless `STATE/grid.toml` `[vm] domain_type` says `kvm`
//! (or `auto` finds KVM usable); it is defined (again) at each start, started after the
//! processes, stopped by ACPI then forced off after `stop_timeout_secs` (`app stop` prints
//! `vm NAME shut down` or `vm NAME forced off: WHY`), forced off when the application fails, and
//! undefined on destroy. A VM that powers off while running makes the application `failed`
//! (`restart = "on-failure"` is refused for VMs so far). A stop that libvirt cannot confirm
//! leaves the application `failed`, so its disks are not exported while QEMU may write them.
//!
//! Substitutions (in `command`, `env`, `ready`, volume `size` and `init_from`): `${app}` the
//! application's name, `${vol:NAME}` a volume's absolute path, `${gridctl}` this executable,
//! `${state}` the state directory, `${PROP}` a property, then `${VAR}` from `STATE/grid.toml`.
//! Commands are argument vectors, never shell lines: a property value stays one argument.
//! A component runs in the application's directory with a clean environment: `PATH`,
//! `HOME=/root` and its `env`; stdout and stderr go to `STATE/apps/NAME/log`. All components of
//! an application form one process group: `stop` sends it SIGTERM, then SIGKILL after the largest
//! `stop_timeout_secs`; any component exiting makes the application `failed`, and a running one
//! whose exiting component says `restart = "on-failure"` is started again by the daemon, at most
//! five times in a row (an `app start` resets the count; `app stop` and `destroy` end it).
//! The descriptor keeps the template's components and volumes, so an application keeps running
//! as provisioned when its template changes later; an import takes the components from the
//! target grid's own template, so it needs that template there.
//!
//! # The lab (`gridctl lab up --grids N --dir DIR`)
//!
//! Grid `gn` (n = 1..N) listens on `127.0.(B+n).1:2222` (B = `--base`, default 0). With `--netns`
//! (root only) each grid runs in its own network namespace with addresses `198.18.(B+n).x`, joined
//! to a router namespace by veth links, so that tests can cut and slow the links between grids
//! (nftables, tc); `DIR/netns` names the namespaces, and `lab down` removes them. Files:
//!
//! ```text
//! DIR/ssh_config                  Host g1..gN: `ssh -F DIR/ssh_config g1 app list --batch`
//! DIR/mig/grid.info               MIG's grid.info for the lab
//! DIR/mig/private.key(.pub)       MIG's key, authorized on every grid (not a peer key)
//! DIR/mig/known_hosts             every controller's host key, as [127.0.n.1]:2222
//! DIR/gn/sshd_config, ssh_host_ed25519_key, authorized_keys, sshd.pid, sshd.log
//! DIR/gn/daemon.pid, daemon.log
//! DIR/gn/state/                   the grid's state directory (above)
//! ```
#![forbid(unsafe_code)]

pub mod blocktree;
pub mod chunk;
pub mod client;
pub mod daemon;
pub mod kvstore;
pub mod lab;
pub mod model;
pub mod protocol;
pub mod stage;
pub mod template;
pub mod throttle;
pub mod transfer;
pub mod util;
pub mod vm;
pub mod volume;

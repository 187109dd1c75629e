/*
 * /init for Arbor's test guests: a static x86-64 program without libc.
 *
 * The KVM on the project's machines is an emulated one on which neither
 * `syscall` nor `int $0x80` from user mode enters the kernel by itself; the
 * kit's kernel carries a patch for each (syscall-fault.patch runs any
 * `syscall` from its page fault; int80-reboot.patch runs exactly the
 * reboot(2) calls below from its invalid-opcode fault). On hardware KVM both
 * instructions work as usual.
 *
 * By default this program sleeps in pause(2) for ever (a `syscall`), so the
 * guest is idle, halted and, with the kit's NO_HZ_IDLE, not even ticking,
 * whenever its kernel threads have nothing to do. Before, it spun on
 * `1: pause; jmp 1b`, which kept a host core busy and, as the scheduler
 * shares the CPU fairly, took half of it from the kernel threads that
 * probe hot-plugged devices. It falls back to that loop should pause(2)
 * answer anything but EINTR.
 *
 * The kernel hands every unknown `key=value` word of its command line to init
 * as an environment variable. If init's environment holds
 *
 *     arbor_init=poweroff   it powers the machine off,
 *     arbor_init=reboot     it restarts the machine,
 *
 * through reboot(2). Any other value, or a failed call, ends in the idle
 * sleep.
 *
 * Stack at _start: argc, argv[0..argc-1], NULL, envp[...], NULL.
 */

#define NR_REBOOT_32		88		/* __NR_reboot, i386 table */
#define NR_PAUSE		34		/* __NR_pause, x86-64 table */
#define EINTR			4
#define REBOOT_MAGIC1		0xfee1dead
#define REBOOT_MAGIC2		672274793	/* 0x28121969 */
#define REBOOT_CMD_POWER_OFF	0x4321fedc
#define REBOOT_CMD_RESTART	0x01234567

	.text
	.globl	_start
	.type	_start, @function
_start:
	mov	(%rsp), %rcx			/* argc */
	lea	16(%rsp,%rcx,8), %r12		/* envp: skip argc, argv, NULL */

next_env:
	mov	(%r12), %rsi
	test	%rsi, %rsi
	jz	idle
	add	$8, %r12

	lea	str_poweroff(%rip), %rdi
	call	streq
	je	do_poweroff

	mov	-8(%r12), %rsi
	lea	str_reboot(%rip), %rdi
	call	streq
	je	do_reboot
	jmp	next_env

do_poweroff:
	mov	$REBOOT_CMD_POWER_OFF, %edx
	jmp	do_reboot_call
do_reboot:
	mov	$REBOOT_CMD_RESTART, %edx
do_reboot_call:
	mov	$NR_REBOOT_32, %eax
	mov	$REBOOT_MAGIC1, %ebx
	mov	$REBOOT_MAGIC2, %ecx
	xor	%esi, %esi			/* arg (unused for these cmds) */
	int	$0x80
	/* Only reached if the call failed: fall through to idle. */

idle:
	mov	$NR_PAUSE, %eax
	syscall
	/* pause(2) returns only -EINTR, after a signal handler ran (init has
	 * none, so it never returns); anything else means it did not run. */
	cmp	$-EINTR, %rax
	je	idle
spin:
	pause
	jmp	spin

/*
 * streq: compare the NUL-terminated strings at %rsi and %rdi.
 * Sets ZF when they are equal. Clobbers %rsi, %rdi, %al.
 */
	.type	streq, @function
streq:
	mov	(%rsi), %al
	cmp	(%rdi), %al
	jne	1f
	test	%al, %al
	jz	1f				/* both ended: equal, ZF=1 */
	inc	%rsi
	inc	%rdi
	jmp	streq
1:	ret

	.section .rodata
str_poweroff:
	.asciz	"arbor_init=poweroff"
str_reboot:
	.asciz	"arbor_init=reboot"

	.section .note.GNU-stack, "", @progbits

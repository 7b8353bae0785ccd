package haproxy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// This file is the one place that spells HAProxy's runtime API: the
// commands haconnect sends and the parsers of their answers. Callers hold
// typed values (a Command to send, a Proc, a TableEntry, a Session read).

// Commander sends one command to a runtime API and returns the answer
// as HAProxy wrote it: an *Admin, a worker reached through the master CLI
// (CLI.Worker), or a stand-in in tests.
type Commander interface {
	Command(c string) (string, error)
}

// CLI is the runtime API, typed, over any Commander.
type CLI struct{ Commander }

// A Command is one runtime API change, built by the functions below and
// sent by Instance.Runtime or CLI.Runtime.
type Command struct {
	text string
	// commits names the file a `commit ssl` command commits, whose answer
	// must show that HAProxy rebuilt a listener with it.
	commits string
}

// String is the command's first line (without a payload such as a
// certificate).
func (c Command) String() string { return firstLine(c.text) }

// ServerState is an administrative state for SetServerState.
type ServerState string

// Server states.
const (
	ServerReady ServerState = "ready"
	ServerDrain ServerState = "drain"
	ServerMaint ServerState = "maint"
)

// ServerHealth is an operational state for SetServerHealth.
type ServerHealth string

// Server health states.
const (
	HealthUp       ServerHealth = "up"
	HealthStopping ServerHealth = "stopping"
	HealthDown     ServerHealth = "down"
)

// SetServerAddr points backend/server at addr:port.
func SetServerAddr(backend, server, addr string, port int) Command {
	return Command{text: fmt.Sprintf("set server %s/%s addr %s port %d", backend, server, addr, port)}
}

// SetServerState sets backend/server's administrative state.
func SetServerState(backend, server string, s ServerState) Command {
	return Command{text: fmt.Sprintf("set server %s/%s state %s", backend, server, s)}
}

// SetServerHealth sets backend/server's operational state, as if its
// health check had said so (its own checks still run).
func SetServerHealth(backend, server string, h ServerHealth) Command {
	return Command{text: fmt.Sprintf("set server %s/%s health %s", backend, server, h)}
}

// SetServerMaxconn sets backend/server's maxconn: its share of an
// upstream's concurrency limit, which changes with the instance count.
func SetServerMaxconn(backend, server string, n int) Command {
	return Command{text: fmt.Sprintf("set maxconn server %s/%s %d", backend, server, n)}
}

// SetProcVar sets a process-wide variable (proc.<name>) to an integer.
// `set var` is experimental in HAProxy 2.6: the command turns the CLI
// session's experimental mode on first, on the same line.
func SetProcVar(name string, v int) Command {
	return Command{text: fmt.Sprintf("experimental-mode on; set var %s int(%d)", name, v)}
}

// AddMap, SetMap and DelMap change one entry of a map file HAProxy
// loaded (named by its path), in memory.
func AddMap(file, key, value string) Command {
	return Command{text: fmt.Sprintf("add map %s %s %s", file, key, value)}
}

// SetMap: see AddMap.
func SetMap(file, key, value string) Command {
	return Command{text: fmt.Sprintf("set map %s %s %s", file, key, value)}
}

// DelMap: see AddMap.
func DelMap(file, key string) Command {
	return Command{text: fmt.Sprintf("del map %s %s", file, key)}
}

// ServerStat is one server's row of `show stat`: its state and the
// counters a passive health check reads.
type ServerStat struct {
	Backend, Server string
	Status          string // UP, DOWN, MAINT, "UP 1/2", ...
	// Retries are the requests retried away from this server (failed
	// connections, and answers matching retry-on: those never reach the
	// observe layer7 error count). Responses5xx and ResponsesOK count the
	// answers it gave that went on to the caller (1xx-4xx are OK).
	Retries, Responses5xx, ResponsesOK int64
}

// ShowServerStats reads every server's row of `show stat`.
func (c CLI) ShowServerStats() ([]ServerStat, error) {
	out, err := c.Command("show stat -1 4 -1")
	if err != nil {
		return nil, err
	}
	return parseServerStats(out)
}

func parseServerStats(out string) ([]ServerStat, error) {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "# ") {
		return nil, fmt.Errorf("show stat: unexpected answer %q", firstLine(out))
	}
	col := map[string]int{}
	for i, name := range strings.Split(strings.TrimPrefix(lines[0], "# "), ",") {
		col[name] = i
	}
	for _, name := range []string{"pxname", "svname", "status", "wretr", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx", "hrsp_5xx"} {
		if _, ok := col[name]; !ok {
			return nil, fmt.Errorf("show stat: no %s column", name)
		}
	}
	var stats []ServerStat
	for _, line := range lines[1:] {
		f := strings.Split(line, ",")
		if len(f) < len(col) {
			continue
		}
		n := func(name string) int64 {
			v, _ := strconv.ParseInt(f[col[name]], 10, 64)
			return v
		}
		stats = append(stats, ServerStat{Backend: f[col["pxname"]], Server: f[col["svname"]], Status: f[col["status"]],
			Retries: n("wretr"), Responses5xx: n("hrsp_5xx"),
			ResponsesOK: n("hrsp_1xx") + n("hrsp_2xx") + n("hrsp_3xx") + n("hrsp_4xx")})
	}
	return stats, nil
}

// SetSSLCert opens a transaction that replaces the certificate and key
// loaded from file with pem; CommitSSLCert makes it live.
func SetSSLCert(file, pem string) Command {
	return Command{text: "set ssl cert " + file + " <<\n" + payload(pem)}
}

// CommitSSLCert commits SetSSLCert's transaction on file.
func CommitSSLCert(file string) Command {
	return Command{text: "commit ssl cert " + file, commits: file}
}

// SetSSLCAFile opens a transaction that replaces the CA file loaded from
// file with pem; CommitSSLCAFile makes it live.
func SetSSLCAFile(file, pem string) Command {
	return Command{text: "set ssl ca-file " + file + " <<\n" + payload(pem)}
}

// CommitSSLCAFile commits SetSSLCAFile's transaction on file.
func CommitSSLCAFile(file string) Command {
	return Command{text: "commit ssl ca-file " + file, commits: file}
}

// payload ends a multi-line argument: it runs up to an empty line, which
// the newline ending the command adds.
func payload(pem string) string {
	if pem != "" && !strings.HasSuffix(pem, "\n") {
		pem += "\n"
	}
	return pem
}

// Runtime sends cmds in order and fails on the first answer that reports
// an error.
func (c CLI) Runtime(cmds ...Command) error {
	for _, cmd := range cmds {
		if err := run(c.Commander, cmd); err != nil {
			return err
		}
	}
	return nil
}

func run(c Commander, cmd Command) error {
	out, err := c.Command(cmd.text)
	if err != nil {
		return fmt.Errorf("runtime %q: %w", cmd, err)
	}
	if bad := runtimeError(out); bad != "" {
		return fmt.Errorf("runtime %q: %s", cmd, bad)
	}
	if cmd.commits != "" && !rebuilt(out, cmd.commits) {
		return fmt.Errorf("runtime %q: HAProxy rebuilt no listener with it: %q", cmd, strings.TrimSpace(out))
	}
	return nil
}

// rebuilt reports whether a commit's answer shows a listener rebuilt with
// file: HAProxy writes one dot per rebuilt instance after the file's name,
//
//	Committing /run/haconnect/leaf.pem.
//	Success!
//
// An answer without one ("Committing <file>" alone, then "Success!") changed
// nothing that serves traffic: HAProxy 2.6.12 answers so to a certificate
// committed after a CA file was, and goes on serving the old one. (It
// rebuilds then only the users of the certificate that do not use that CA
// file; in haconnect's configuration there are none.)
func rebuilt(out, file string) bool {
	for _, line := range strings.Split(out, "\n") {
		if dots, ok := strings.CutPrefix(line, "Committing "+file); ok {
			return dots != "" && strings.Trim(dots, ".") == ""
		}
	}
	return false
}

// WorkerPid is the pid of the worker answering (`show info`).
func (c CLI) WorkerPid() (int, error) {
	out, err := c.Command("show info")
	if err != nil {
		return 0, err
	}
	return infoField(out, "Pid"), nil
}

// Reachable reports whether the socket answers at all.
func (c CLI) Reachable() error {
	_, err := c.Command("help")
	return err
}

// ErrNotMaster is ShowProc's answer from a socket that is not the master
// CLI (a worker's stats socket does not know `show proc`).
var ErrNotMaster = errors.New("not HAProxy's master CLI")

// Proc is one process the master CLI lists.
type Proc struct {
	PID int
	// Type is "master", "worker", or a program's name.
	Type string
	// Old: a worker left from before a reload, finishing its connections.
	Old bool
}

// ShowProc lists the master's processes (`show proc`, master CLI only).
func (c CLI) ShowProc() ([]Proc, error) {
	out, err := c.Command("show proc")
	if err != nil {
		return nil, err
	}
	return parseProcs(out)
}

// parseProcs reads `show proc`:
//
//	#<PID>          <type>          <reloads>       <uptime>        <version>
//	9498            master          1 [failed: 0]   0d00h00m04s     2.6.12
//	# workers
//	9554            worker          0               0d00h00m01s     2.6.12
//	# old workers
//	9509            worker          1               0d00h00m09s     2.6.12
//	# programs
func parseProcs(out string) ([]Proc, error) {
	if !strings.HasPrefix(strings.TrimSpace(out), "#<PID>") {
		return nil, fmt.Errorf("%w: %q", ErrNotMaster, firstLine(strings.TrimSpace(out)))
	}
	var procs []Proc
	old := false
	for _, line := range strings.Split(out, "\n") {
		if h, ok := strings.CutPrefix(line, "#"); ok {
			old = strings.TrimSpace(h) == "old workers"
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		pid, err := strconv.Atoi(f[0])
		if err != nil {
			continue
		}
		procs = append(procs, Proc{PID: pid, Type: f[1], Old: old && f[1] == "worker"})
	}
	return procs, nil
}

// Worker is the runtime API of one worker, reached through the master CLI
// (`@!<pid> <command>`): old workers too, which no stats socket reaches
// once a reload has given it to the new one.
func (c CLI) Worker(pid int) CLI {
	return CLI{viaMaster{master: c.Commander, prefix: "@!" + strconv.Itoa(pid) + " "}}
}

type viaMaster struct {
	master Commander
	prefix string
}

func (v viaMaster) Command(c string) (string, error) { return v.master.Command(v.prefix + c) }

// ErrNoSuchTable is ShowTable's answer for a table the configuration does
// not declare.
var ErrNoSuchTable = errors.New("no such table")

// TableEntry is one stick-table entry.
type TableEntry struct {
	ID  string // HAProxy's address of the entry, "0x..."
	Key string
	// Use counts the streams tracking the entry: 0 once they ended.
	Use int
	// Data are the stored values by name ("gpc0", "conn_cur", ...).
	Data map[string]string
}

// ShowTable dumps the entries of table name (`show table`).
func (c CLI) ShowTable(name string) ([]TableEntry, error) {
	out, err := c.Command("show table " + name)
	if err != nil {
		return nil, err
	}
	if strings.Contains(out, "No such table") {
		return nil, fmt.Errorf("%w: %s", ErrNoSuchTable, name)
	}
	return parseTable(out), nil
}

// parseTable reads `show table <name>`:
//
//	# table: haconnect_conns, type: string, size:102400, used:1
//	0x55e0f1a2b3c0: key=127.0.0.1:40312|spiffe://td/ns/default/dc/dc1/svc/web use=1 exp=0 shard=0
func parseTable(out string) []TableEntry {
	var entries []TableEntry
	for _, line := range strings.Split(out, "\n") {
		id, _, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(id, "0x") {
			continue
		}
		f := fields(line)
		e := TableEntry{ID: id, Key: f["key"], Data: map[string]string{}}
		e.Use, _ = strconv.Atoi(f["use"])
		for k, v := range f {
			if k != "key" && k != "use" {
				e.Data[k] = v
			}
		}
		entries = append(entries, e)
	}
	return entries
}

// Session is one stream (`show sess`).
type Session struct {
	ID       string // "0x...", the argument of ShutdownSession
	Proto    string
	Src      string // client address:port as HAProxy prints it
	Frontend string
	Backend  string
}

// ShowSessions lists the streams of the worker answering (`show sess`).
func (c CLI) ShowSessions() ([]Session, error) {
	out, err := c.Command("show sess")
	if err != nil {
		return nil, err
	}
	return parseSessions(out), nil
}

// parseSessions reads `show sess`:
//
//	0x55e0f1b4c000: proto=tcpv4 src=127.0.0.1:40312 fe=public_listener be=local_app srv=app ts=00 ...
func parseSessions(out string) []Session {
	var list []Session
	for _, line := range strings.Split(out, "\n") {
		id, _, ok := strings.Cut(line, ":")
		if !ok || !strings.HasPrefix(id, "0x") {
			continue
		}
		f := fields(line)
		list = append(list, Session{ID: id, Proto: f["proto"], Src: f["src"], Frontend: f["fe"], Backend: f["be"]})
	}
	return list
}

// ShutdownSession ends the stream id (`shutdown session`). It reports
// false, with no error, when HAProxy answered instead of doing it: the
// stream had ended meanwhile ("No such session").
func (c CLI) ShutdownSession(id string) (bool, error) {
	out, err := c.Command("shutdown session " + id)
	if err != nil {
		return false, err
	}
	return strings.TrimSpace(out) == "", nil
}

// fields splits "a=b c=d" into a map; words without "=" are skipped.
func fields(line string) map[string]string {
	m := map[string]string{}
	for _, w := range strings.Fields(line) {
		if k, v, ok := strings.Cut(w, "="); ok {
			m[k] = v
		}
	}
	return m
}

func infoField(out, name string) int {
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, name+": "); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// runtimeError recognises HAProxy's runtime API failure answers.
func runtimeError(out string) string {
	t := strings.TrimSpace(out)
	low := strings.ToLower(t)
	for _, bad := range []string{"unknown", "error", "can't", "cannot", "not found", "no such", "failed", "invalid", "require"} {
		if strings.Contains(low, bad) {
			return t
		}
	}
	return ""
}

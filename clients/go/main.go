// Command client is a Go gRPC client of a Coppice gateway (envd's wire contract, proto/): it
// lists a directory in a sandbox (filesystem.Filesystem/ListDir), then runs a command there
// (process.Process/Start), printing its output as it streams and ending with its exit code.
//
// Build it with clients/go/build (the stubs are generated from proto/ by protoc at build time).
//
//	client [flags] [--] COMMAND [ARG...]
//
// Where the gateway is and which sandbox to reach come from flags or the environment:
//
//	-url      $E2B_SANDBOX_URL  the gateway, http://host:port (h2c) or https://host:port; when
//	                            empty, https://49983-<sandbox>.<domain> (wildcard DNS)
//	-domain   $E2B_DOMAIN       set: the sandbox is named by the :authority 49983-<sandbox>.<domain>;
//	                            empty: by the E2b-Sandbox-Id and E2b-Sandbox-Port headers
//	-sandbox  $E2B_SANDBOX_ID   the sandbox id (what POST /sandboxes answered)
//	-token    $E2B_ACCESS_TOKEN its envdAccessToken, sent as X-Access-Token (secured sandboxes)
//	-user     the sandbox user the calls run as (HTTP Basic, empty password), default "user"
//	-dir      the directory to list, default /home/user
//
// Over https the roots are the system's; Go reads SSL_CERT_FILE, so `coppice env --tls` is enough.
//
// Output: one "== ListDir DIR" line, one "<type> <size> <permissions> <path>" line per entry,
// "== Start COMMAND...", the command's stdout and stderr (to this program's stdout and stderr),
// then "== exit code N". The program exits with the command's exit code; a failed call prints
// "client: ..." on stderr and exits with 125.
package main

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"

	"coppice/envd/filesystem"
	"coppice/envd/process"
)

const envdPort = "49983"

// failure is the exit status when a call fails (not the command): apart from 126-128+n of shells.
const failure = 125

type options struct {
	url, domain, sandbox, token, user, dir string
	timeout                                time.Duration
	command                                []string
}

func parseOptions() options {
	var o options
	flag.StringVar(&o.url, "url", os.Getenv("E2B_SANDBOX_URL"), "the gateway: http://host:port or https://host:port")
	flag.StringVar(&o.domain, "domain", os.Getenv("E2B_DOMAIN"), "the sandbox domain (routing by :authority)")
	flag.StringVar(&o.sandbox, "sandbox", os.Getenv("E2B_SANDBOX_ID"), "the sandbox id")
	flag.StringVar(&o.token, "token", os.Getenv("E2B_ACCESS_TOKEN"), "the sandbox's envd access token")
	flag.StringVar(&o.user, "user", "user", "the user the calls run as")
	flag.StringVar(&o.dir, "dir", "/home/user", "the directory to list")
	flag.DurationVar(&o.timeout, "timeout", time.Minute, "the deadline of all calls together")
	flag.Parse()
	o.command = flag.Args()
	return o
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "client: "+format+"\n", args...)
	os.Exit(failure)
}

// dial opens the connection: h2c for http://, TLS (h2 by ALPN) for https://.
func dial(ctx context.Context, o options) (*grpc.ClientConn, error) {
	target := o.url
	if target == "" {
		if o.domain == "" {
			return nil, errors.New("no gateway: set -url (E2B_SANDBOX_URL) or -domain (E2B_DOMAIN)")
		}
		target = "https://" + envdPort + "-" + o.sandbox + "." + o.domain
	}
	u, err := url.Parse(target)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("bad gateway url %q", target)
	}
	address := u.Host
	if u.Port() == "" {
		port := "80"
		if u.Scheme == "https" {
			port = "443"
		}
		address = net.JoinHostPort(u.Hostname(), port)
	}
	// Not WithBlock: a failed connection (a TLS handshake, say) fails the first call, with why.
	var dialOptions []grpc.DialOption
	authority := ""
	if o.domain != "" {
		authority = envdPort + "-" + o.sandbox + "." + o.domain
		dialOptions = append(dialOptions, grpc.WithAuthority(authority))
	}
	switch u.Scheme {
	case "http":
		dialOptions = append(dialOptions, grpc.WithInsecure())
	case "https":
		config := &tls.Config{MinVersion: tls.VersionTLS12}
		if authority != "" {
			config.ServerName = authority // the certificate covers *.<domain>
		}
		dialOptions = append(dialOptions, grpc.WithTransportCredentials(credentials.NewTLS(config)))
	default:
		return nil, fmt.Errorf("bad gateway url %q: want http:// or https://", target)
	}
	return grpc.DialContext(ctx, address, dialOptions...)
}

// withHeaders adds what the gateway routes and authenticates by to every call of ctx.
func withHeaders(ctx context.Context, o options) context.Context {
	pairs := []string{
		"authorization", "Basic " + base64.StdEncoding.EncodeToString([]byte(o.user+":")),
	}
	if o.domain == "" {
		pairs = append(pairs, "e2b-sandbox-id", o.sandbox, "e2b-sandbox-port", envdPort)
	}
	if o.token != "" {
		pairs = append(pairs, "x-access-token", o.token)
	}
	return metadata.AppendToOutgoingContext(ctx, pairs...)
}

func listDir(ctx context.Context, conn *grpc.ClientConn, dir string) error {
	response, err := filesystem.NewFilesystemClient(conn).ListDir(ctx, &filesystem.ListDirRequest{Path: dir})
	if err != nil {
		return fmt.Errorf("ListDir %s: %w", dir, err)
	}
	fmt.Printf("== ListDir %s\n", dir)
	for _, entry := range response.GetEntries() {
		kind := strings.ToLower(strings.TrimPrefix(entry.GetType().String(), "FILE_TYPE_"))
		fmt.Printf("%s %d %s %s\n", kind, entry.GetSize(), entry.GetPermissions(), entry.GetPath())
	}
	return nil
}

// run starts the command and reads its stream to the end event: the command's exit code.
func run(ctx context.Context, conn *grpc.ClientConn, command []string) (int32, error) {
	stdin := false
	request := &process.StartRequest{
		Process: &process.ProcessConfig{Cmd: command[0], Args: command[1:]},
		Stdin:   &stdin,
	}
	stream, err := process.NewProcessClient(conn).Start(ctx, request)
	if err != nil {
		return 0, fmt.Errorf("Start: %w", err)
	}
	fmt.Printf("== Start %s\n", strings.Join(command, " "))
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			return 0, errors.New("Start: the stream ended before the end event")
		}
		if err != nil {
			return 0, fmt.Errorf("Start: %w", err)
		}
		event := response.GetEvent()
		switch {
		case event.GetData() != nil:
			data := event.GetData()
			os.Stdout.Write(data.GetStdout())
			os.Stderr.Write(data.GetStderr())
			os.Stdout.Write(data.GetPty())
		case event.GetEnd() != nil:
			end := event.GetEnd()
			if !end.GetExited() { // killed by a signal, or never started: say how it ended
				how := end.GetStatus()
				if end.GetError() != "" && end.GetError() != how {
					how += " (" + end.GetError() + ")"
				}
				fmt.Fprintf(os.Stderr, "client: the process did not exit: %s\n", how)
			}
			return end.GetExitCode(), nil
		}
		// start and keepalive events carry nothing to print.
	}
}

func main() {
	o := parseOptions()
	if o.sandbox == "" {
		fail("no sandbox: set -sandbox or E2B_SANDBOX_ID")
	}
	if len(o.command) == 0 {
		fail("no command: client [flags] [--] COMMAND [ARG...]")
	}
	ctx, cancel := context.WithTimeout(context.Background(), o.timeout)
	defer cancel()
	conn, err := dial(ctx, o)
	if err != nil {
		fail("connect: %v", err)
	}
	defer conn.Close()
	ctx = withHeaders(ctx, o)
	if err := listDir(ctx, conn, o.dir); err != nil {
		fail("%v", err)
	}
	exitCode, err := run(ctx, conn, o.command)
	if err != nil {
		fail("%v", err)
	}
	fmt.Printf("== exit code %d\n", exitCode)
	conn.Close()
	cancel()
	os.Exit(int(exitCode))
}

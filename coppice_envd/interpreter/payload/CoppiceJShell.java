// Runs Java snippets for java_kernel.py, INSIDE a sandbox, with the JDK's jdk.jshell API.
//
// Started as `java CoppiceJShell.java` (the JDK compiles a single source file on launch, so the
// template needs no build step). Snippets run in this JVM ("local" execution): no second JVM, no
// JDI socket, and System.out/err are ours to frame. Protocol, both ways a header line
// `<kind> <byte length>` then that many UTF-8 bytes: the kernel sends `code`; we answer with
// `out`/`err` (one frame per write, as the program wrote), at most one `result` (the last
// snippet's value), at most one `error` (name, value, traceback separated by NUL), then `done`.

import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.stream.Collectors;
import jdk.jshell.Diag;
import jdk.jshell.EvalException;
import jdk.jshell.JShell;
import jdk.jshell.Snippet;
import jdk.jshell.SnippetEvent;
import jdk.jshell.SourceCodeAnalysis;
import jdk.jshell.UnresolvedReferenceException;
import jdk.jshell.VarSnippet;

public final class CoppiceJShell {
    private static final OutputStream PROTOCOL = new FileOutputStream(FileDescriptor.out);
    private static ByteArrayOutputStream capture; // set while printing a result

    static synchronized void send(String kind, byte[] data, int off, int len) {
        if (capture != null && kind.equals("out")) {
            capture.write(data, off, len);
            return;
        }
        try {
            PROTOCOL.write((kind + " " + len + "\n").getBytes(StandardCharsets.UTF_8));
            PROTOCOL.write(data, off, len);
            PROTOCOL.flush();
        } catch (IOException e) {
            Runtime.getRuntime().halt(1); // the kernel is gone
        }
    }

    static void send(String kind, String text) {
        byte[] data = text.getBytes(StandardCharsets.UTF_8);
        send(kind, data, 0, data.length);
    }

    static PrintStream framing(String kind) {
        OutputStream sink = new OutputStream() {
            @Override
            public void write(int b) {
                write(new byte[] {(byte) b}, 0, 1);
            }

            @Override
            public void write(byte[] b, int off, int len) {
                if (len > 0) {
                    send(kind, b, off, len);
                }
            }
        };
        // A subclass: println then writes its text and its line break apart, as IJava's output
        // arrives upstream (the official suite reads "Hello, World!" as the first stdout item).
        return new PrintStream(sink, true, StandardCharsets.UTF_8) {};
    }

    public static void main(String[] args) throws Exception {
        // Snippets run in this JVM: our stdin is the kernel's, not theirs.
        DataInputStream in = new DataInputStream(System.in);
        System.setIn(new java.io.ByteArrayInputStream(new byte[0]));
        System.setOut(framing("out"));
        System.setErr(framing("err"));
        // As upstream, environment variables are read as system properties (System.getProperty):
        // the sandbox's and the context's are copied in; per-execution ones are set as properties.
        for (Map.Entry<String, String> e : System.getenv().entrySet()) {
            if (System.getProperty(e.getKey()) == null) {
                System.setProperty(e.getKey(), e.getValue());
            }
        }
        JShell shell = JShell.builder()
                .executionEngine("local")
                .out(System.out)
                .err(System.err)
                .build();
        // An interrupt stops the running snippet instead of ending the JVM (and its state).
        sun.misc.Signal.handle(new sun.misc.Signal("INT"), signal -> shell.stop());
        shell.eval("if (false) {}"); // javac loaded and warm now, not in the first cell
        send("ready", "");
        while (true) {
            String header = readLine(in);
            if (header == null) {
                return;
            }
            byte[] code = new byte[Integer.parseInt(header.split(" ")[1])];
            in.readFully(code);
            try {
                run(shell, new String(code, StandardCharsets.UTF_8));
            } catch (RuntimeException e) {
                send("error", e.getClass().getName() + "\0" + e.getMessage() + "\0");
            }
            System.out.flush();
            System.err.flush();
            send("done", "");
        }
    }

    private static String readLine(DataInputStream in) throws IOException {
        StringBuilder line = new StringBuilder();
        for (int b = in.read(); b != '\n'; b = in.read()) {
            if (b < 0) {
                return null;
            }
            line.append((char) b);
        }
        return line.toString();
    }

    /** Each snippet of `code` in turn, stopping at the first that fails. */
    private static void run(JShell shell, String code) {
        SourceCodeAnalysis analysis = shell.sourceCodeAnalysis();
        String rest = code;
        SnippetEvent last = null;
        while (!rest.isBlank()) {
            SourceCodeAnalysis.CompletionInfo info = analysis.analyzeCompletion(rest);
            if (info.completeness() == SourceCodeAnalysis.Completeness.EMPTY) {
                break;
            }
            String source = rest;
            rest = "";
            if (info.completeness().isComplete()) {
                source = info.source();
                rest = info.remaining();
            }
            last = null;
            for (SnippetEvent event : shell.eval(source)) {
                if (event.causeSnippet() != null) {
                    continue; // a dependent snippet updated, not this one
                }
                if (event.status() == Snippet.Status.REJECTED) {
                    reportRejected(shell, event.snippet());
                    return;
                }
                if (event.exception() != null) {
                    reportException(event.exception());
                    return;
                }
                last = event;
            }
        }
        if (last != null) {
            reportValue(shell, last);
        }
    }

    /** The value of a last snippet that is an expression, as its toString (IJava's text). */
    private static void reportValue(JShell shell, SnippetEvent event) {
        Snippet snippet = event.snippet();
        String name;
        String type;
        if (snippet.subKind() == Snippet.SubKind.TEMP_VAR_EXPRESSION_SUBKIND) {
            name = ((VarSnippet) snippet).name();
            type = ((VarSnippet) snippet).typeName();
        } else if (snippet.kind() == Snippet.Kind.EXPRESSION) {
            name = ((jdk.jshell.ExpressionSnippet) snippet).name();
            type = ((jdk.jshell.ExpressionSnippet) snippet).typeName();
        } else {
            return;
        }
        if (type.endsWith("]")) {
            send("result", event.value()); // jshell's rendering of an array beats "[I@1b6d3586"
            return;
        }
        ByteArrayOutputStream text = new ByteArrayOutputStream();
        synchronized (CoppiceJShell.class) {
            capture = text;
        }
        try {
            List<SnippetEvent> printed = shell.eval("System.out.print(String.valueOf(" + name + "));");
            System.out.flush();
            if (printed.stream().anyMatch(e -> e.exception() != null)) {
                text.reset(); // a toString that throws: jshell's own rendering instead
                text.writeBytes(String.valueOf(event.value()).getBytes(StandardCharsets.UTF_8));
            }
        } finally {
            synchronized (CoppiceJShell.class) {
                capture = null;
            }
        }
        send("result", text.toString(StandardCharsets.UTF_8));
    }

    private static void reportRejected(JShell shell, Snippet snippet) {
        List<Diag> diagnostics = shell.diagnostics(snippet).collect(Collectors.toList());
        String value = diagnostics.stream()
                .filter(Diag::isError)
                .map(d -> d.getMessage(Locale.ROOT))
                .collect(Collectors.joining("\n"));
        if (value.isEmpty()) {
            value = "the snippet was rejected";
        }
        String source = snippet.source().strip();
        send("error", "CompilationException\0" + value + "\0" + source + "\n" + value + "\n");
    }

    private static void reportException(Exception exception) {
        String name = exception.getClass().getName();
        String message = exception.getMessage();
        if (exception instanceof EvalException) {
            name = ((EvalException) exception).getExceptionClassName();
        } else if (exception instanceof UnresolvedReferenceException) {
            Snippet snippet = ((UnresolvedReferenceException) exception).getSnippet();
            message = "attempted to use " + snippet.source().strip()
                    + ", which cannot be used until what it refers to is declared";
        }
        StringBuilder traceback = new StringBuilder(name);
        if (message != null) {
            traceback.append(": ").append(message);
        }
        traceback.append('\n');
        for (StackTraceElement frame : exception.getStackTrace()) {
            traceback.append("\tat ").append(frame).append('\n');
        }
        send("error", name + "\0" + (message == null ? "" : message) + "\0" + traceback);
    }
}

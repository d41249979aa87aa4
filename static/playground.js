// The playground: one question to every pane, answers streamed side by side.
//
// The conversation lives in this page: each pane keeps its own history (the shared questions and that
// pane's own answers). A question is POSTed to /api/playground/chat, which answers with a server-sent
// event stream; EventSource cannot POST a conversation, so the stream is read with fetch. Model output
// is untrusted: it is only ever inserted as text (textContent), never as HTML.
(function () {
  "use strict";

  var root = document.getElementById("playground");
  if (!root) return;
  var maxPanes = Number(root.dataset.maxPanes);
  var picks = document.getElementById("pane-picks");
  var conversation = document.getElementById("conversation");
  var form = document.getElementById("composer");
  var prompt = document.getElementById("prompt");
  var sendButton = document.getElementById("send");
  var stopButton = document.getElementById("stop");
  var statusLine = document.getElementById("chat-status");
  var alpacaMode = document.getElementById("alpaca-mode");
  var blindMode = document.getElementById("blind-mode");
  var LETTERS = "ABCD";
  var validationCard = document.getElementById("validation-card");
  var validationRows = document.getElementById("validation-rows");

  var turns = [];        // [{user: {role, content, alpaca?}, answers: [text per pane]}]
  var prefix = [];       // earlier turns every pane shares (a validation row's own conversation)
  var rowSystem = null;  // a validation row's own system prompt, kept for the follow-up questions
  var controller = null; // the AbortController of the question being answered
  var conversationId = newConversationId(); // groups the votes of one conversation

  function newConversationId() {
    return "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
  }

  function shuffled(count) {
    var order = [];
    for (var i = 0; i < count; i++) order.push(i);
    for (var j = count - 1; j > 0; j--) {
      var k = Math.floor(Math.random() * (j + 1));
      var t = order[j]; order[j] = order[k]; order[k] = t;
    }
    return order;
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function csrfToken() {
    try { return JSON.parse(document.body.getAttribute("hx-headers"))["X-CSRF-Token"]; } catch (e) { return ""; }
  }

  function selects() { return Array.prototype.slice.call(picks.querySelectorAll("select.pane-target")); }

  function paneLabel(select) { return select.options[select.selectedIndex].textContent.trim(); }

  function renumber() {
    selects().forEach(function (s, i) { s.closest(".pane-pick").querySelector("span").textContent = "Pane " + (i + 1); });
    var count = selects().length;
    document.getElementById("add-pane").disabled = count >= maxPanes;
    picks.querySelectorAll(".remove-pane").forEach(function (b) { b.disabled = count <= 1; });
    loadValidationRows();
  }

  // ---- conversation ---------------------------------------------------------------------------
  function resetConversation() {
    if (controller) controller.abort();
    turns = [];
    prefix = [];
    rowSystem = null;
    conversationId = newConversationId();
    conversation.innerHTML = "";
    var empty = el("p", "empty", "Ask a question below.");
    empty.id = "conversation-empty";
    conversation.appendChild(empty);
    statusLine.textContent = "";
  }

  function panesChanged() {
    if (turns.length) {
      resetConversation();
      statusLine.textContent = "The panes changed, so a new conversation started.";
    }
    renumber();
  }

  function historyFor(pane) {
    var messages = prefix.slice();
    turns.forEach(function (turn) {
      messages.push(turn.user);
      messages.push({ role: "assistant", content: turn.answers[pane] || "" });
    });
    return messages;
  }

  // A turn is cloned from the page's <template id="turn-template">: the question, one answer box per pane
  // (cloned from its .answer), the dataset's reference answer when there is one, and an error line.
  function renderTurn(user, labels, reference) {
    var empty = document.getElementById("conversation-empty");
    if (empty) empty.remove();
    var turn = document.getElementById("turn-template").content.firstElementChild.cloneNode(true);
    turn.querySelector(".turn-text").textContent = user.content;
    var grid = turn.querySelector(".answers");
    var model = grid.querySelector(".answer:not(.reference)");
    var ref = grid.querySelector(".answer.reference");
    grid.style.setProperty("--columns", String(labels.length + (reference ? 1 : 0)));
    var panes = labels.map(function (label, i) {
      var box = model.cloneNode(true);
      box.dataset.pane = String(i);
      box.querySelector(".pane-badge").textContent = String(i + 1);
      box.querySelector(".answer-label").textContent = label;
      grid.insertBefore(box, ref);
      return {
        box: box,
        state: box.querySelector(".answer-state"),
        text: box.querySelector(".answer-text"),
        stats: box.querySelector(".answer-stats"),
      };
    });
    model.remove();
    if (reference) ref.querySelector(".answer-text").textContent = reference;
    else ref.remove();
    var problem = turn.querySelector(".turn-error");
    conversation.appendChild(turn);
    turn.scrollIntoView({ block: "nearest" });
    return { turn: turn, panes: panes, problem: problem };
  }

  function renderContext(messages) {
    var empty = document.getElementById("conversation-empty");
    if (empty) empty.remove();
    var box = el("article", "context-turns");
    box.appendChild(el("p", "muted small", "Earlier in this conversation (from the dataset):"));
    messages.forEach(function (m) {
      var line = el("div", "turn-question");
      line.appendChild(el("span", "turn-role", m.role === "user" ? "You" : m.role));
      line.appendChild(el("p", "turn-text", m.content));
      box.appendChild(line);
    });
    conversation.appendChild(box);
  }

  function setBusy(busy) {
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
    root.classList.toggle("busy", busy);
  }

  function settings() {
    function num(id) { var v = document.getElementById(id).value; return v === "" ? null : Number(v); }
    var sampling = {
      max_new_tokens: num("max-new-tokens") || 200,
      temperature: num("temperature") || 0,
      top_p: num("top-p") || 1,
      repetition_penalty: num("repetition-penalty") || 1,
    };
    var seed = num("seed");
    if (seed !== null) sampling.seed = seed;
    return sampling;
  }

  // Server-sent events from a fetch body (a POST, which EventSource cannot send), parsed by the vendored
  // eventsource-parser.
  function readEvents(response, onEvent) {
    return import("/static/vendor/eventsource-parser-4.1.3/stream.js").then(function (parser) {
      var reader = response.body
        .pipeThrough(new TextDecoderStream())
        .pipeThrough(new parser.EventSourceParserStream())
        .getReader();
      function pump() {
        return reader.read().then(function (chunk) {
          if (chunk.done) return;
          onEvent(chunk.value.event || "message", JSON.parse(chunk.value.data));
          return pump();
        });
      }
      return pump();
    });
  }

  function problemText(body, status) {
    try {
      var detail = JSON.parse(body).detail;
      return detail.map(function (d) { return (d.field ? d.field + ": " : "") + d.message; }).join("; ");
    } catch (e) {
      return "The question could not be sent (HTTP " + status + ").";
    }
  }

  function ask(user, options) {
    options = options || {};
    if (controller) return;
    var targets = selects().map(function (s) { return s.value; });
    var labels = selects().map(paneLabel);
    var system = rowSystem !== null ? rowSystem : document.getElementById("system-prompt").value.trim();
    var body = {
      panes: targets.map(function (target, i) {
        var pane = { target: target, messages: historyFor(i).concat([user]) };
        if (system) pane.system = system;
        return pane;
      }),
      sampling: settings(),
    };
    var histories = targets.map(function (target, i) { return historyFor(i); });
    // Blind: the panes are shown as A, B… in a new order for each question, and named only after the vote.
    var blind = blindMode.checked && targets.length >= 2;
    var position = blind ? inverse(shuffled(targets.length)) : null;
    var shown = blind ? targets.map(function (t, i) { return "Answer " + LETTERS[position[i]]; }) : labels;
    var view = renderTurn(user, shown, options.reference);
    if (blind) {
      view.turn.classList.add("blind");
      view.panes.forEach(function (p, i) {
        p.box.style.order = String(position[i]);
        p.box.querySelector(".pane-badge").textContent = LETTERS[position[i]];
      });
      var referenceBox = view.turn.querySelector(".answer.reference");
      if (referenceBox) referenceBox.style.order = String(maxPanes + 1);
    }
    var answers = targets.map(function () { return ""; });
    var finished = false;
    controller = new AbortController();
    setBusy(true);
    statusLine.textContent = "Answering…";

    function fail(message) {
      view.problem.textContent = message;
      view.problem.hidden = false;
      view.panes.forEach(function (p) { if (!p.text.textContent) p.state.textContent = "No answer."; });
    }

    function onEvent(name, data) {
      var pane = typeof data.pane === "number" ? view.panes[data.pane] : null;
      if (name === "queued") {
        view.panes.forEach(function (p) { p.state.textContent = data.message; });
      } else if (name === "status" && pane) {
        pane.state.textContent = data.message;
      } else if (name === "start" && pane) {
        pane.state.textContent = "Answering…";
        pane.box.classList.add("streaming");
      } else if (name === "token" && pane) {
        pane.box.dataset.chunks = String(Number(pane.box.dataset.chunks || 0) + 1);
        answers[data.pane] += data.text;
        pane.text.textContent = answers[data.pane];
        pane.state.textContent = "";
      } else if (name === "replace" && pane) {
        answers[data.pane] = data.text;
        pane.text.textContent = data.text;
      } else if (name === "end") {
        finished = true;
        data.results.forEach(function (r, i) {
          var p = view.panes[i];
          p.box.classList.remove("streaming");
          p.state.textContent = r.finish_reason === "cancelled" ? "Stopped." : (r.text ? "" : "(empty answer)");
          var speed = r.seconds > 0 ? (r.tokens / r.seconds).toFixed(1) + " tokens/s" : "";
          var first = r.first_token_seconds !== null ? "first token " + r.first_token_seconds.toFixed(2) + " s" : "";
          var reason = r.finish_reason === "length" ? "hit the token limit" : "";
          p.stats.textContent = [r.tokens + " tokens", speed, first, reason].filter(Boolean).join(" · ");
        });
      } else if (name === "error") {
        finished = true;
        fail(data.message);
      }
    }

    fetch("/api/playground/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream", "X-CSRF-Token": csrfToken() },
      body: JSON.stringify(body),
      signal: controller.signal,
    }).then(function (response) {
      if (!response.ok) {
        return response.text().then(function (text) { finished = true; fail(problemText(text, response.status)); });
      }
      return readEvents(response, onEvent);
    }).catch(function (error) {
      if (error.name === "AbortError") {
        view.panes.forEach(function (p) { p.box.classList.remove("streaming"); p.state.textContent = "Stopped."; });
        finished = true;
      } else {
        fail("The connection to Tuneboard was lost: " + error.message);
      }
    }).then(function () {
      if (!finished) fail("The answer ended early: the connection closed.");
      // A question nobody answered (refused, or the host was down) stays on screen but not in the history.
      if (answers.some(function (a) { return a; })) turns.push({ user: user, answers: answers });
      if (blind && finished && answers.filter(function (a) { return a; }).length >= 2) {
        offerVote(view, {
          user: user, system: system, targets: targets, labels: labels, answers: answers.slice(),
          position: position, histories: histories, sampling: body.sampling,
        });
      }
      controller = null;
      setBusy(false);
      statusLine.textContent = "";
      prompt.focus();
    });
  }

  function inverse(order) {
    var position = [];
    order.forEach(function (pane, k) { position[pane] = k; });
    return position;
  }

  // The vote under a blind turn: a verdict, then (for a better answer, or all bad) the chosen text to edit
  // or write, then Save; the answer reveals which pane wrote which.
  function offerVote(view, asked) {
    var form = document.getElementById("vote-template").content.firstElementChild.cloneNode(true);
    var verdicts = form.querySelector(".vote-verdicts");
    var edit = form.querySelector(".vote-edit");
    var chosen = form.querySelector(".vote-chosen");
    var result = form.querySelector(".vote-result");
    var byPosition = [];
    asked.position.forEach(function (k, pane) { byPosition[k] = pane; });
    var verdict = null;
    var best = null;

    function button(text, onClick) {
      var b = el("button", "vote-verdict", text);
      b.type = "button";
      b.addEventListener("click", function () {
        verdicts.querySelectorAll("button").forEach(function (x) { x.classList.remove("primary"); });
        b.classList.add("primary");
        onClick();
      });
      verdicts.appendChild(b);
    }
    byPosition.forEach(function (pane, k) {
      button(LETTERS[k] + " is better", function () {
        verdict = "better"; best = k;
        form.querySelector(".vote-edit-label").firstChild.textContent = "Answer " + LETTERS[k] + ", as it will be saved ";
        chosen.value = asked.answers[pane];
        edit.hidden = false;
        chosen.focus();
      });
    });
    button("Tie", function () { verdict = "tie"; best = null; save(); });
    button("All bad", function () {
      verdict = "both_bad"; best = null;
      form.querySelector(".vote-edit-label").firstChild.textContent = "A better answer, if you write one ";
      chosen.value = "";
      edit.hidden = false;
      chosen.focus();
    });

    function save() {
      var messages = (asked.system ? [{ role: "system", content: asked.system }] : [])
        .concat(asked.histories[best === null ? 0 : byPosition[best]])
        .concat([asked.user])
        .map(function (m) { return { role: m.role, content: m.content }; });
      var text = verdict === "tie" ? null : chosen.value;
      var vote = {
        conversation_id: conversationId,
        messages: messages,
        answers: byPosition.map(function (pane) { return { target: asked.targets[pane], text: asked.answers[pane] }; }),
        verdict: verdict,
        best: best,
        chosen: text !== null && text.trim() ? text : null,
        sampling: asked.sampling,
      };
      result.textContent = "Saving…";
      fetch("/api/votes", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
        body: JSON.stringify(vote),
      }).then(function (response) {
        return response.text().then(function (body) {
          if (!response.ok) { result.textContent = problemText(body, response.status); return; }
          form.querySelectorAll("button, textarea").forEach(function (x) { x.disabled = true; });
          edit.hidden = verdict === "tie" || !vote.chosen;
          // the reveal: each answer gets its pane's name
          view.panes.forEach(function (p, pane) {
            var k = asked.position[pane];
            p.box.querySelector(".answer-label").textContent = asked.labels[pane] + " (answer " + LETTERS[k] + ")";
            p.box.classList.toggle("voted-best", verdict === "better" && k === best);
          });
          view.turn.classList.add("revealed");
          var named = byPosition.map(function (pane, k) { return LETTERS[k] + ": " + asked.labels[pane]; }).join(" · ");
          result.textContent = "Vote saved. " + named;
        });
      }).catch(function (error) { result.textContent = "The vote was not saved: " + error.message; });
    }

    form.addEventListener("submit", function (e) { e.preventDefault(); save(); });
    view.turn.appendChild(form);
  }

  function userMessage() {
    if (alpacaMode.checked) {
      var instruction = document.getElementById("alpaca-instruction").value.trim();
      var input = document.getElementById("alpaca-input").value.trim();
      if (!instruction) return null;
      return {
        role: "user",
        content: input ? instruction + "\n\n" + input : instruction,
        alpaca: { instruction: instruction, input: input },
      };
    }
    var text = prompt.value.trim();
    return text ? { role: "user", content: text } : null;
  }

  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var user = userMessage();
    if (!user) {
      statusLine.textContent = alpacaMode.checked ? "Write an instruction first." : "Write a message first.";
      return;
    }
    prompt.value = "";
    document.getElementById("alpaca-instruction").value = "";
    document.getElementById("alpaca-input").value = "";
    ask(user);
  });
  prompt.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  stopButton.addEventListener("click", function () { if (controller) controller.abort(); });
  document.getElementById("new-conversation").addEventListener("click", resetConversation);
  alpacaMode.addEventListener("change", function () {
    document.getElementById("alpaca-fields").hidden = !alpacaMode.checked;
    document.getElementById("prompt-field").hidden = alpacaMode.checked;
  });

  // ---- panes ----------------------------------------------------------------------------------
  document.getElementById("add-pane").addEventListener("click", function () {
    if (selects().length >= maxPanes) return;
    var used = selects().map(function (s) { return s.value; });
    var copy = document.getElementById("pane-pick-template").content.cloneNode(true);
    var select = copy.querySelector("select");
    var fresh = Array.prototype.find.call(select.options, function (o) { return used.indexOf(o.value) < 0; });
    if (fresh) select.value = fresh.value;  // something not on screen yet: the next run or checkpoint
    picks.appendChild(copy);
    panesChanged();
  });
  picks.addEventListener("click", function (e) {
    var button = e.target.closest(".remove-pane");
    if (!button || selects().length <= 1) return;
    button.closest(".pane-pick").remove();
    panesChanged();
  });
  picks.addEventListener("change", function (e) { if (e.target.matches("select.pane-target")) panesChanged(); });

  // ---- validation set -------------------------------------------------------------------------
  var shownRun = null;
  function loadValidationRows() {
    var run = null;
    selects().some(function (s) { run = s.options[s.selectedIndex].dataset.run || null; return run; });
    validationCard.hidden = !run;
    if (!run || run === shownRun) return;
    shownRun = run;
    if (window.htmx) htmx.ajax("GET", "/playground/validation?run=" + run, { target: validationRows, swap: "innerHTML" });
  }
  validationRows.addEventListener("click", function (e) {
    var button = e.target.closest(".ask-row");
    if (!button || controller) return;
    var row = JSON.parse(button.dataset.row);
    var question = row.question.slice();
    var user = question.pop();
    if (row.alpaca) user = { role: "user", content: user.content, alpaca: row.alpaca };
    resetConversation();
    if (question.length && question[0].role === "system") rowSystem = question.shift().content;
    prefix = question;
    if (prefix.length) renderContext(prefix);
    ask(user, { reference: row.reference });
  });

  shownRun = (validationRows.getAttribute("hx-get") || "").split("run=")[1] || null;
  renumber();
})();
